"""The artifact store on a real S3-compatible server (moto's server mode on 127.0.0.1, through
pyarrow's S3 filesystem and the standard AWS_* variables), failing the ways object stores fail:
unreachable at start, an object corrupted on the server, an artifact gone."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import uuid
from pathlib import Path

import pytest

from mlpfuse.orchestrator.store import MIRROR_ENV, ArtifactStore, StoreUnreachable
from tests.conftest import S3_BUCKET, tiny_llama_with_tokenizer, write_corpus


def _s3(env: dict[str, str]):  # noqa: ANN202 - boto3's client type
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_an_unreachable_store_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mlpfuse.orchestrator.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    uri = "s3://nowhere-bucket/store"
    with pytest.raises(StoreUnreachable, match=f"cannot reach the artifact store {uri}"):
        ArtifactStore(uri)
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"model": "smollm2-135m", "cache": uri, "output": str(tmp_path / "out")}))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot reach the artifact store {uri}" in err and "Traceback" not in err
    assert not (tmp_path / "mirror").exists() or not any((tmp_path / "mirror").rglob("manifest.json"))


def test_a_missing_bucket_is_refused(s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(StoreUnreachable, match="s3://no-such-bucket-here/x"):
        ArtifactStore("s3://no-such-bucket-here/x")


def test_an_object_corrupted_on_the_server_is_detected_named_and_quarantined(
        s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"store-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{S3_BUCKET}/{prefix}"
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node1"))
    store = ArtifactStore(uri)
    staging = store.staging_dir("s", "k")
    staging.mkdir(parents=True)
    payload = bytes(range(256)) * 4096  # 1 MiB
    (staging / "w.bin").write_bytes(payload)
    store.commit("s", "k", staging, {"result": {}})
    s3 = _s3(s3_server)
    bad = bytearray(payload)
    bad[12345] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    s3.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/artifacts/s/k/w.bin", Body=bytes(bad))

    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node2"))  # a node that must download it
    with caplog.at_level(logging.WARNING, logger="mlpfuse.store"):
        assert ArtifactStore(uri).get("s", "k") is None
    assert "w.bin fails its checksum" in caplog.text and f"artifacts/s/k in {uri}" in caplog.text
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)["Contents"]]
    assert not any(k.startswith(f"{prefix}/artifacts/s/k/") for k in keys)  # gone: it will be recomputed
    record = [k for k in keys if k.startswith(f"{prefix}/quarantine/s-k-") and k.endswith("QUARANTINED")]
    assert len(record) == 1
    why = s3.get_object(Bucket=S3_BUCKET, Key=record[0])["Body"].read().decode()
    assert "w.bin fails its checksum" in why
    assert not (ArtifactStore(uri).artifact_dir("s", "k") / "w.bin").exists()  # never handed out


def test_a_run_recomputes_an_input_corrupted_on_the_server(ray_local, s3_server: dict[str, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           smollm2_tokenizer: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second run on another node (an empty mirror) needs the shard, whose layer file was
    corrupted on the server: the task detects it, the session recomputes the shard and runs the
    task again; the run completes with the first run's perplexity. Ray's workers started without
    the server's settings (``ray_local``): the runs hand them to their tasks."""
    import mlpfuse

    prefix = f"run-{uuid.uuid4().hex[:8]}"
    spec = {"model": str(tiny_llama_with_tokenizer(tmp_path / "ckpt", smollm2_tokenizer, layers=2)),
            "cache": f"s3://{S3_BUCKET}/{prefix}", "output": str(tmp_path / "out"),
            "data": {"corpus": str(write_corpus(tmp_path / "corpus")), "block_size": 32, "calib_tokens": 256,
                     "eval_tokens": 128},
            "evaluate": {"window": 32, "stride": 16}}
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node1"))
    first = mlpfuse.compress(spec)
    report = json.loads(first.report_path.read_text())
    shard_key, eval_key = report["stages"]["shard"]["cache_key"], report["stages"]["evaluate"]["cache_key"]
    s3 = _s3(s3_server)
    layer = f"{prefix}/artifacts/shard/{shard_key}/layers/00001.safetensors"
    body = bytearray(s3.get_object(Bucket=S3_BUCKET, Key=layer)["Body"].read())
    body[-5] ^= 0xFF
    s3.put_object(Bucket=S3_BUCKET, Key=layer, Body=bytes(body))
    s3.delete_object(Bucket=S3_BUCKET, Key=f"{prefix}/artifacts/evaluate/{eval_key}/manifest.json")  # to redo

    # The next run's nodes have no copy of the shard: its tasks' mirrors (Ray's worker processes
    # keep theirs) and the driver's.
    import ray

    uri = spec["cache"]
    workers = ray.get(ray.remote(lambda: str(ArtifactStore(uri).local)).options(
        runtime_env={"env_vars": s3_server}).remote())
    for mirror in (Path(workers), ArtifactStore(uri).local):
        shutil.rmtree(mirror / "artifacts" / "shard" / shard_key, ignore_errors=True)
    with caplog.at_level(logging.WARNING):
        second = mlpfuse.compress(spec)
    again = json.loads(second.report_path.read_text())
    assert "shard: its artifact is gone from the store or failed verification; recomputing it" in caplog.text
    assert again["stages"]["shard"]["status"] == "run" and again["stages"]["evaluate"]["status"] == "run"
    assert again["base"]["perplexity"] == report["base"]["perplexity"]
    shutil.rmtree(workers, ignore_errors=True)  # the Ray workers' mirror of this test's store


class _CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server that goes down (stops listening, drops
    every connection) when a request line matching ``cut_at`` passes through it: the server as a
    client sees it, unreachable mid-upload. ``restart()`` brings it back on the same port."""

    def __init__(self, target_port: int, cut_at: bytes):
        import threading

        self.target, self.cut_at = target_port, cut_at
        self.port = _closed_port()
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._listen()

    def _listen(self) -> None:
        import threading

        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(16)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool) -> None:
        try:
            while data := src.recv(65536):
                if inspect and self.cut_at in data and not self.cut.is_set():
                    self.cut.set()
                    self.down()
                    return
                dst.sendall(data)
        except OSError:
            pass

    def down(self) -> None:
        self.server.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self._conns = []

    def restart(self) -> None:
        self._listen()


def test_the_server_lost_mid_upload_leaves_nothing_visible_and_the_rerun_completes(
        s3_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard stage's commit uploads every file, then the manifest; the server goes away as
    the manifest's PUT arrives. The task fails, the files without a manifest are not an artifact
    (for this node or any other), and the same task run again, the server back, commits it."""
    from dataclasses import asdict

    from mlpfuse.orchestrator.pipeline import execute_node, make_node
    from mlpfuse.stages.shard import ShardConfig
    from tests.conftest import make_tiny

    prefix = f"cut-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{S3_BUCKET}/{prefix}"
    node = asdict(make_node({}, "shard", "shard", ShardConfig(model=str(make_tiny("llama", tmp_path / "ckpt")))))
    proxy = _CuttingProxy(int(s3_server["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]),
                          f"PUT /{S3_BUCKET}/{prefix}/artifacts/shard/{node['key']}/manifest.json".encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node1"))
    try:
        with pytest.raises(OSError):
            execute_node(uri, node)
        assert proxy.cut.is_set()
        proxy.restart()
        keys = [o["Key"] for o in _s3(s3_server).list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)["Contents"]]
        uploaded = [k for k in keys if f"/artifacts/shard/{node['key']}/" in k]
        assert uploaded and not any(k.endswith("/manifest.json") for k in uploaded)  # files, no manifest
        monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node2"))
        assert ArtifactStore(uri).get("shard", node["key"]) is None  # not an artifact, for any node
        monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node1"))
        assert execute_node(uri, node)["status"] == "run"  # the re-run completes
        monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "node3"))
        art = ArtifactStore(uri).get("shard", node["key"])  # verified download on a fresh node
        assert art is not None and (art.path / "shard.json").exists()
    finally:
        proxy.down()


@pytest.mark.cluster
def test_two_runs_on_two_clusters_share_one_remote_cache(s3_server: dict[str, str], tmp_path: Path,
                                                         smollm2_tokenizer: Path) -> None:
    """Two `mlpfuse run`s at once, each with its own Ray and its own mirror (two machines), of
    overlapping specs against one S3 store: both succeed; every stage they share has one artifact
    in the store, which verifies on a third machine, and both runs report the same result for it."""
    import os
    import subprocess
    import sys

    prefix = f"two-{uuid.uuid4().hex[:8]}"
    base = {"model": str(tiny_llama_with_tokenizer(tmp_path / "ckpt", smollm2_tokenizer, layers=4)),
            "cache": f"s3://{S3_BUCKET}/{prefix}",
            "data": {"corpus": str(write_corpus(tmp_path / "corpus")), "block_size": 32, "calib_tokens": 512,
                     "eval_tokens": 128},
            "evaluate": {"window": 32, "stride": 16}, "ray": {"num_cpus": 1}}
    specs = {"a": {**base, "budget": {"target": {"ff_params": 0.7}, "methods": ["prune"], "halving": {"min_tokens": 64}}},
             "b": {**base, "budget": {"target": {"ff_params": 0.7}, "methods": ["prune", "layer_drop"],
                                      "halving": {"min_tokens": 64}}}}
    procs = {}
    for name, spec in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({**spec, "name": name, "output": str(tmp_path / f"out-{name}")}))
        env = {**os.environ, **s3_server, MIRROR_ENV: str(tmp_path / f"machine-{name}"), "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        procs[name] = subprocess.Popen([sys.executable, "-m", "mlpfuse.orchestrator.cli", "run", str(path)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    outs = {n: p.communicate(timeout=900)[0] for n, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == {"a": 0, "b": 0}, outs["a"][-2000:] + outs["b"][-2000:]
    reports = {n: json.loads((tmp_path / f"out-{n}" / "report.json").read_text()) for n in specs}
    shared = {s["cache_key"]: (s["stage"], name) for name, s in reports["a"]["stages"].items()}
    b_keys = {s["cache_key"] for s in reports["b"]["stages"].values()}
    shared = {k: v for k, v in shared.items() if k in b_keys}
    assert len(shared) >= 8  # shard, data, collect, evaluate, similarity, prune candidates, ...
    os.environ[MIRROR_ENV] = str(tmp_path / "machine-c")
    try:
        third = ArtifactStore(f"s3://{S3_BUCKET}/{prefix}")
        for key, (stage, name) in shared.items():
            art = third.get(stage, key)
            assert art is not None, f"{name}: no verified artifact in the store"
    finally:
        os.environ.pop(MIRROR_ENV)
    assert reports["a"]["base"] == reports["b"]["base"]
    # A candidate of both runs is the same artifact; halving may take it through more rounds in one
    # (b has more rivals), so each round both reached must score the same.
    ca = {c["name"]: c for c in reports["a"]["candidates"]}
    cb = {c["name"]: c for c in reports["b"]["candidates"]}
    assert ca and ca.keys() <= cb.keys()
    for name, c in ca.items():
        assert c["cache_key"] == cb[name]["cache_key"], name
        pairs = list(zip(c["rounds"], cb[name]["rounds"], strict=False))
        assert pairs and all((x["tokens"], x["perplexity"]) == (y["tokens"], y["perplexity"]) for x, y in pairs), name
    both_ran = [n for n, s in reports["a"]["stages"].items()
                if s["cache_key"] in b_keys and s["status"] == "run"
                and any(t["cache_key"] == s["cache_key"] and t["status"] == "run" for t in reports["b"]["stages"].values())]
    print(f"\n[two clusters] {len(shared)} shared stages; computed by both (identical, one artifact kept): {both_ran}")


@pytest.mark.faults
def test_distillation_killed_on_one_machine_resumes_on_another_from_the_store(
        s3_server: dict[str, str], tmp_path: Path, smollm2_tokenizer: Path) -> None:
    """`mlpfuse run` with the cache on the S3 server is SIGKILLed, with its Ray, once distillation
    has saved a checkpoint in the store; the re-run on another machine (an empty mirror: no staging,
    no artifact files) restores that checkpoint, resumes from it and ends with the uninterrupted
    run's losses and distilled perplexity."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_faults import _kill_tree, _tree

    ckpt = tiny_llama_with_tokenizer(tmp_path / "ckpt", smollm2_tokenizer, layers=2)
    corpus = write_corpus(tmp_path / "corpus")
    s3 = _s3(s3_server)

    def run(name: str, prefix: str, machine: str, **popen: object) -> subprocess.Popen:
        spec = {"name": name, "model": str(ckpt), "cache": f"s3://{S3_BUCKET}/{prefix}",
                "output": str(tmp_path / f"out-{name}"), "ray": {"num_cpus": 2},
                "data": {"corpus": str(corpus), "block_size": 32, "calib_tokens": 512, "eval_tokens": 128},
                "evaluate": {"window": 32, "stride": 16},
                "budget": {"target": {"ff_params": 0.7}, "methods": ["prune"], "halving": {"min_tokens": 64}},
                "distill": {"train": {"steps": 300, "lr": 1e-3, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1,
                                      "checkpoint_every": 20, "seed": 0}, "max_blocks": 8}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(spec))
        env = {**os.environ, **s3_server, MIRROR_ENV: str(tmp_path / machine), "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        return subprocess.Popen([sys.executable, "-m", "mlpfuse.orchestrator.cli", "run", str(path)], env=env,
                                start_new_session=True, **popen)

    def keys(prefix: str, part: str) -> list[str]:
        listing = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{prefix}/{part}")
        return [o["Key"] for o in listing.get("Contents", [])]

    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    proc = run("killed", prefix, "machine-a", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not any(k.endswith("/state.json") for k in keys(prefix, "staging/distill-")):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it saved a checkpoint"
            time.sleep(0.05)
    finally:
        _kill_tree(proc.pid, _tree(proc.pid))
        proc.wait()
    assert not keys(prefix, "artifacts/distill/"), "killed too late: distillation had finished"
    state = [k for k in keys(prefix, "staging/distill-") if k.endswith("/state.json")][0]
    saved = json.loads(s3.get_object(Bucket=S3_BUCKET, Key=state.replace("state.json", "progress.json"))["Body"].read())

    again = run("killed", prefix, "machine-b", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = again.communicate(timeout=900)[0]
    assert again.returncode == 0, out[-3000:]
    reference = run("reference", f"ref-{uuid.uuid4().hex[:8]}", "machine-r", stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
    assert reference.wait(timeout=900) == 0
    got = json.loads((tmp_path / "out-killed" / "report.json").read_text())["distill"]
    want = json.loads((tmp_path / "out-reference" / "report.json").read_text())["distill"]
    assert got["resumed_from"] >= saved["steps_done"] > 0
    assert got["losses"] == want["losses"] and got["perplexity"] == want["perplexity"]
    assert not keys(prefix, "staging/distill-")  # the commit removed the saved state
    print(f"\n[distill across machines] killed after step {saved['steps_done']} was saved in the store; "
          f"resumed on another machine from step {got['resumed_from']} of {got['steps']}")
