"""Two Ray nodes that share no cache disk: the second node runs in its own mount namespace with an
empty tmpfs over the directory where the cache (and the remote store's mirror) lie, so it sees
only its own files there, as a node of a real cluster would. Opt-in (``-m cluster``).

- With the cache on a real S3-compatible server (moto's server mode, started here on 127.0.0.1)
  and every stage pinned alternately to one node or the other (Ray custom resources), each stage
  reads inputs that another node produced: the run completes with the one-node run's winner and
  perplexities, and the same exported weights.
- With a plain local cache, the run is refused with exit 2 before any work, naming the node and
  the path, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import S3_BUCKET as BUCKET
from tests.test_cluster import ROOT, _env, _start_cluster, _stop_cluster, _submit

pytestmark = pytest.mark.cluster

# Each stage pinned to one node, so that nearly every input crosses from one node to the other.
ON = {"shard": "head", "data": "node2", "collect_part": "node2", "collect": "head", "evaluate": "node2",
      "similarity": "head", "compress": "node2", "prefix": "head", "probe": "node2", "layer_errors": "head",
      "export": "node2", "samples": "head"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> dict[str, Path]:
    from tests.conftest import tiny_llama_with_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("two-disks")
    return {"ckpt": tiny_llama_with_tokenizer(root / "ckpt", smollm2_tokenizer, layers=4),
            "corpus": write_corpus(root / "corpus")}


def _spec(assets: dict[str, Path], cache: str, out: Path, *, pinned: bool) -> dict:
    spec = {
        "name": "two-disks", "model": str(assets["ckpt"]), "cache": cache, "output": str(out),
        "data": {"corpus": str(assets["corpus"]), "block_size": 32, "calib_tokens": 512, "eval_tokens": 128},
        "evaluate": {"window": 32, "stride": 16},
        "budget": {"target": {"ff_params": 0.7}, "methods": ["prune"], "halving": {"min_tokens": 64}},
    }
    if pinned:
        spec["resources"] = {"stages": {s: {"custom": {n: 0.01}} for s, n in ON.items()}}
    return spec


def _write(spec: dict, spec_dir: Path) -> Path:
    path = spec_dir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _weights(export: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(export.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _one_node(assets: dict[str, Path], tmp: Path) -> dict:
    """The reference: the same spec on one machine (embedded Ray, a local cache)."""
    out = tmp / "one-node"
    spec = tmp / "one-node.yaml"
    spec.write_text(yaml.safe_dump(_spec(assets, str(tmp / "one-node-cache"), out, pinned=False)))
    proc = subprocess.run([sys.executable, "-m", "mlpfuse.orchestrator.cli", "run", str(spec)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_stages_on_two_disks_share_artifacts_through_s3(tmp_path: Path, assets: dict[str, Path],
                                                         s3_server: dict[str, str], spec_dir: Path) -> None:
    private = tmp_path / "node-disk"  # node2 sees an empty tmpfs here; the head sees this machine's
    private.mkdir()
    env = {**s3_server, "MLPFUSE_MIRROR": str(private / "mirror")}
    nodes, url, temp_root = _start_cluster(2, tmp_path, env=env, private=private)
    try:
        spec = _write(_spec(assets, f"s3://{BUCKET}/store", tmp_path / "out", pinned=True), spec_dir)
        t0 = time.time()
        rc, out = _submit(spec, url, timeout=600)
        seconds = time.time() - t0
    finally:
        _stop_cluster(nodes, temp_root)
    assert rc == 0, out[-5000:]
    two = json.loads((tmp_path / "out" / "report.json").read_text())
    where: dict[str, set[str]] = {}  # "head"/"node2" -> the nodes its pinned stages ran on
    for s in two["stages"].values():
        if s["status"] == "run":
            where.setdefault(ON[s["stage"]], set()).add(s["node"])
    assert {len(v) for v in where.values()} == {1} and where["head"] != where["node2"], where
    assert len({s["stage"] for s in two["stages"].values()} - {"prefix"}) >= len(ON) - 1
    # collect (head) merged parts made on node2, whose files stayed in node2's namespace: the
    # head's mirror holds them because it downloaded them from S3.
    assert any((private / "mirror").rglob("collect_part/*/manifest.json"))

    one = _one_node(assets, tmp_path)
    assert two["winner"]["name"] == one["winner"]["name"]
    assert two["base"]["perplexity"] == pytest.approx(one["base"]["perplexity"], rel=1e-6)
    ppl = {c["name"]: c.get("perplexity") for c in one["candidates"]}
    assert len(ppl) == len(two["candidates"]) > 1
    for c in two["candidates"]:
        assert c.get("perplexity") == pytest.approx(ppl[c["name"]], rel=1e-6, nan_ok=True), c["name"]
    a, b = _weights(tmp_path / "out" / "export"), _weights(tmp_path / "one-node" / "export")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    scale = max(float(b[k].double().abs().max()) for k in b)
    print(f"\n[two disks] submit --wait {seconds:.1f}s; stages per node {where}; "
          f"largest exported weight difference vs one node {worst:.3g} (largest weight {scale:.3g})")
    assert worst <= 1e-5 * scale


def test_a_local_cache_the_second_node_cannot_see_is_refused(tmp_path: Path, assets: dict[str, Path],
                                                              spec_dir: Path) -> None:
    private = tmp_path / "node-disk"
    private.mkdir()
    cache, out = private / "cache", tmp_path / "out"
    nodes, url, temp_root = _start_cluster(1, tmp_path, private=private)
    try:
        rc, log = _submit(_write(_spec(assets, str(cache), out, pinned=False), spec_dir), url, timeout=300)
    finally:
        _stop_cluster(nodes, temp_root)
    assert rc == 2, log[-4000:]
    assert f"the cache {cache} is not shared: node 127.0.0.1 (node " in log
    assert "Traceback" not in log.split("the cache")[0][-2000:]
    # Nothing half-written: no artifact, no staging, no output but the run's log.
    assert [p for p in (cache / "artifacts").rglob("*")] == []
    assert [p for p in (cache / "staging").rglob("*")] == []
    assert [p.name for p in out.iterdir()] == ["run.log"]  # which says why
    assert f"the cache {cache} is not shared" in (out / "run.log").read_text()


@pytest.fixture()
def spec_dir() -> Iterator[Path]:
    """A directory inside the project (specs travel in the job's working dir), removed afterwards."""
    d = ROOT / ".pytest-cluster-spec" / os.urandom(6).hex()
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        try:
            d.parent.rmdir()
        except OSError:
            pass
