"""Fault injection: dead workers, killed runs, corrupt artifacts, concurrent runs, a full disk, and
the security defaults. Every recovery is checked against a fresh run of the same spec: the
artifacts' manifest checksums, the bytes of every artifact file, and report.json's ``base``.

Counts (faults injected, runs recovered, bytes lost) are printed per test and summed at the end of
the module (``pytest tests/test_faults.py -s``).

Bugs these tests found are pinned by regression tests named ``test_fixed_*``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from mlpfuse.orchestrator.cli import main
from mlpfuse.orchestrator.store import ArtifactStore
from tests.conftest import tiny_llama_with_tokenizer, write_corpus

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("shard", "data", "collect_part", "collect", "similarity", "evaluate")
FAULTS: Counter[str] = Counter()


# ----- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _fault_summary() -> Iterator[None]:
    yield
    print(
        f"\n[faults] injected={FAULTS['injected']} recovered={FAULTS['recovered']} "
        f"bytes_lost={FAULTS['bytes_lost']} bytes_compared={FAULTS['bytes_compared']} "
        f"kills_mid_stage={FAULTS['kills_mid_stage']} kills_between_stages={FAULTS['kills_between_stages']}"
    )


def _tally(test: str, *, injected: int = 0, recovered: int = 0, bytes_lost: int = 0, note: str = "") -> None:
    FAULTS["injected"] += injected
    FAULTS["recovered"] += recovered
    FAULTS["bytes_lost"] += bytes_lost
    print(f"\n[faults] {test}: injected={injected} recovered={recovered} bytes_lost={bytes_lost} {note}".rstrip())


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> dict[str, Path]:
    """A tiny random Llama (12 layers; SmolLM2's real tokenizer, so vocab 49152) and a small corpus."""
    root = tmp_path_factory.mktemp("faults")
    ckpt = tiny_llama_with_tokenizer(root / "ckpt", smollm2_tokenizer, layers=12)
    return {"root": root, "ckpt": ckpt, "corpus": write_corpus(root / "corpus")}


def _spec(tmp: Path, assets: dict[str, Path], name: str, **over: object) -> Path:
    """A spec whose cache is ``tmp/<name>-cache`` and output ``tmp/<name>-out``."""
    spec: dict = {
        "name": "faults", "model": str(assets["ckpt"]), "cache": str(tmp / f"{name}-cache"),
        "output": str(tmp / f"{name}-out"),
        "data": {"corpus": str(assets["corpus"]), "block_size": 32, "calib_tokens": 1024, "eval_tokens": 256},
        "ray": {"num_cpus": 2},
        "collect": {"num_workers": 2},
        "evaluate": {"window": 32, "stride": 16},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cache(spec: Path) -> Path:
    return Path(yaml.safe_load(spec.read_text())["cache"])


def _report(spec: Path) -> dict:
    return json.loads((Path(yaml.safe_load(spec.read_text())["output"]) / "report.json").read_text())


def _snapshot(cache: Path) -> dict[str, dict]:
    """{"stage/key": manifest files (size, sha256 of every file)} of every committed artifact."""
    out = {}
    for m in sorted((cache / "artifacts").glob("*/*/manifest.json")):
        man = json.loads(m.read_text())
        out[f"{man['stage']}/{man['key']}"] = man["files"]
    return out


def _bytes_lost(cache: Path, fresh: Path) -> int:
    """Bytes of the fresh run's artifact files that ``cache`` does not hold identically."""
    lost = 0
    for f in (fresh / "artifacts").rglob("*"):
        if not f.is_file() or f.name == "manifest.json":
            continue
        g = cache / f.relative_to(fresh)
        a = f.read_bytes()
        b = g.read_bytes() if g.exists() else b""
        FAULTS["bytes_compared"] += len(a)
        lost += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) if a != b else 0
    return lost


def _verify_all(cache: Path) -> int:
    """Verify (size + sha256) every committed artifact; returns how many. Nothing may be corrupt."""
    store = ArtifactStore(cache)
    n = 0
    for m in sorted((cache / "artifacts").glob("*/*/manifest.json")):
        stage, key = m.parent.parent.name, m.parent.name
        assert store.get(stage, key) is not None, f"committed artifact {stage}/{key} fails verification"
        n += 1
    assert list((cache / "quarantine").iterdir()) == []
    return n


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(pid: int, known: list[psutil.Process] = ()) -> int:
    """SIGKILL ``pid`` and every process it started. All are frozen first (``known`` ones at once,
    without scanning /proc), so none can start another process or write another byte; then killed.
    Returns how many processes died."""
    frozen: dict[int, psutil.Process] = {}

    def freeze(procs: list[psutil.Process]) -> None:
        for p in procs:
            if p.pid not in frozen:
                try:
                    p.suspend()
                    frozen[p.pid] = p
                except psutil.NoSuchProcess:
                    pass

    freeze(list(known))
    for _ in range(10):
        procs = _tree(pid)
        if all(p.pid in frozen for p in procs):
            break
        freeze(procs)
    for p in frozen.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(frozen.values()), timeout=10)
    return len(frozen)


def _cli(spec: Path, *args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlpfuse.orchestrator.cli", "run", str(spec), *args], cwd=ROOT, env=env or _env(),
        start_new_session=True, **popen,
    )


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path], ray_local) -> dict:
    """The reference: one uninterrupted run of the spec in a fresh cache."""
    tmp = tmp_path_factory.mktemp("fresh")
    spec = _spec(tmp, assets, "fresh")
    assert main(["run", str(spec)]) == 0
    report = _report(spec)
    cache = _cache(spec)
    return {"cache": cache, "snapshot": _snapshot(cache), "base": report["base"], "report": report}


def _assert_equals_fresh(spec: Path, fresh: dict) -> int:
    """The run of ``spec`` ended with exactly the fresh run's artifacts and base metrics."""
    cache = _cache(spec)
    assert _snapshot(cache) == fresh["snapshot"]
    assert _report(spec)["base"] == fresh["base"]
    lost = _bytes_lost(cache, fresh["cache"])
    assert lost == 0
    return lost


# ----- 1. a Ray worker dies mid-stage --------------------------------------------------------------
def _executing_workers() -> list[psutil.Process]:
    """This process's Ray workers that are executing a stage task (Ray titles them
    ``ray::execute_node``; idle ones are ``ray::IDLE``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith("ray::execute_node"):
            out.append(p)
    return out


@pytest.mark.parametrize("stage,retries", [("shard", 2), ("collect_part", 2), ("collect_part", 0)],
                         ids=["shard", "collect_part", "collect_part-no-retries"])
def test_worker_sigkill_mid_stage(stage: str, retries: int, tmp_path: Path, assets: dict, fresh: dict,
                                  ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    """One Ray worker executing ``stage`` is SIGKILLed after it committed its first layer. With
    retries the task is re-run by Ray and resumes from the committed layers; without, the run fails
    (exit 1) and the next run resumes the same way. Either way the result equals a fresh run's."""
    spec = _spec(tmp_path, assets, f"wk-{stage}-{retries}", ray={"max_retries": retries})
    staging = _cache(spec) / "staging"
    # shard commits one marker per layer; collect_part one stats marker per layer (its last file).
    marker = "layers__*.json" if stage == "shard" else "stats__*.json"
    killed: list[int] = []
    keys: list[str] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            if any(staging.glob(f"{stage}-*")):  # started: know its worker before its first layer lands
                victims = _executing_workers()
                hits = list(staging.glob(f"{stage}-*/.parts/{marker}"))
                if hits and victims:
                    for v in victims:
                        killed.append(v.pid)
                        v.kill()
                    keys.append(hits[0].parent.parent.name.split("-", 1)[1])
                    return
            time.sleep(0.002)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    failure = ""
    try:
        if retries:
            assert main(["run", str(spec)]) == 0
        else:
            assert main(["run", str(spec)]) == 1  # the CLI reports the dead worker, exit 1
            err = capsys.readouterr().err
            assert "worker failed" in err and "re-run to resume" in err
            failure = err.strip().splitlines()[-1][:100]
    finally:
        stop.set()
        t.join()
    assert len(killed) == 1, f"expected one worker killed mid-{stage}, killed {killed}"
    if not retries:
        assert main(["run", str(spec)]) == 0
    report = _report(spec)
    (node,) = [n for n, r in report["stages"].items() if r["cache_key"] == keys[0]]
    assert report["stages"][node]["status"] == "run"
    result = json.loads((Path(report["stages"][node]["path"]) / "manifest.json").read_text())["result"]
    resumed = result["layers_reused"] if stage == "shard" else result["layers_resumed_from"]
    assert resumed >= 1, f"the retried {stage} task recomputed from scratch: {result}"
    lost = _assert_equals_fresh(spec, fresh)
    _verify_all(_cache(spec))
    _tally(f"worker-sigkill[{stage}, max_retries={retries}]", injected=1, recovered=1, bytes_lost=lost,
           note=f"(resumed after {resumed} committed layers{'; first run: ' + failure if failure else ''})")


# ----- 2. the whole run is SIGKILLed at a random point of each stage -------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_run_sigkill_in_each_stage_resumes(stage: str, tmp_path: Path, assets: dict, fresh: dict,
                                           ray_local) -> None:
    """``mlpfuse run`` as a subprocess, killed (with its Ray: raylet, GCS, workers) at a seeded
    random point after ``stage`` starts; the re-run finishes, reuses every committed stage, and ends
    equal to a fresh run."""
    rng = random.Random(f"mlpfuse-faults-{stage}")
    # The stage's duration in the reference run; the kill lands at a random fraction of it.
    durations = {r["stage"]: r["seconds"] for r in fresh["report"]["stages"].values()}
    delay = rng.uniform(0.05, 0.95) * max(durations[stage], 0.05)
    spec = _spec(tmp_path, assets, f"kill-{stage}")
    cache = _cache(spec)
    proc = _cli(spec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    known: list[psutil.Process] = []
    try:
        deadline, scanned = time.time() + 45, 0.0
        while time.time() < deadline and proc.poll() is None:
            if any((cache / "staging").glob(f"{stage}-*")) or any((cache / "artifacts" / stage).glob("*")):
                break
            if time.time() - scanned > 0.25:
                known, scanned = _tree(proc.pid), time.time()
            time.sleep(0.002)
        else:
            pytest.fail(f"stage {stage} never started (exit code {proc.poll()})")
        time.sleep(delay)
    finally:
        n = _kill_tree(proc.pid, known)
        proc.wait()
    committed = {f"{m.parent.parent.name}/{m.parent.name}" for m in (cache / "artifacts").glob("*/*/manifest.json")}
    in_progress = sorted(p.name for p in (cache / "staging").iterdir())
    mid = any(p.startswith(f"{stage}-") for p in in_progress)
    FAULTS["kills_mid_stage" if mid else "kills_between_stages"] += 1

    assert main(["run", str(spec)]) == 0
    report = _report(spec)
    for name, r in report["stages"].items():
        was = f"{r['stage']}/{r['cache_key']}" in committed
        assert r["status"] == ("hit" if was else "run"), f"{name}: committed before the kill={was}, {r['status']}"
    lost = _assert_equals_fresh(spec, fresh)
    _verify_all(cache)
    _tally(f"run-sigkill[{stage}]", injected=1, recovered=1, bytes_lost=lost,
           note=f"(delay {delay:.3f}s, {n} processes killed, committed before: "
                f"{sorted(c.split('/')[0] for c in committed)}, in progress: {in_progress})")


# ----- 3. a committed artifact is damaged on disk ------------------------------------------------
def _damage(f: Path, how: str) -> int:
    """Truncate or flip one bit of ``f``; returns the bytes damaged."""
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
        return len(data) - len(data) // 2
    i = random.Random(f"flip-{f.name}").randrange(len(data))
    data[i] ^= 0x10
    with open(f, "r+b") as fh:  # in place: a hard-linked twin is damaged too, as on a real disk
        fh.write(data)
    return 1


@pytest.mark.parametrize(
    "target,how",
    [("shard:layers/00005.safetensors", "truncate"),
     ("collect:features/L00003/mlp/part-001.parquet", "bitflip"),
     ("data:calib.parquet", "bitflip"),
     ("evaluate:manifest.json", "truncate")],
    ids=["shard-truncate", "collect-bitflip", "data-bitflip", "evaluate-manifest-truncate"],
)
def test_corrupt_artifact_is_quarantined_and_recomputed(target: str, how: str, tmp_path: Path, assets: dict,
                                                        fresh: dict, ray_local) -> None:
    spec = _spec(tmp_path, assets, "corrupt")
    cache = _cache(spec)
    assert main(["run", str(spec)]) == 0
    stage, rel = target.split(":")
    (art,) = (cache / "artifacts" / stage).iterdir()
    f = art / rel
    # collect hard-links its parts' Parquet files: damaging one damages both artifacts.
    twins = {p.parent.name for p in (cache / "artifacts").glob("*/*") if p.name != art.name
             and any(q.stat().st_ino == f.stat().st_ino for q in p.rglob(f.name))}
    damaged = _damage(f, how)

    assert main(["run", str(spec)]) == 0
    report = _report(spec)
    recomputed = {r["stage"] for r in report["stages"].values() if r["status"] == "run"}
    expected = {stage} | ({"collect_part"} if twins else set())
    assert recomputed == expected
    quarantined = sorted((cache / "quarantine").iterdir())
    assert len(quarantined) == len(expected)
    assert all((q / "QUARANTINED").read_text().strip() for q in quarantined)
    why = (next(q for q in quarantined if q.name.startswith(f"{stage}-")) / "QUARANTINED").read_text()
    assert ("bytes" in why or "manifest" in why) if how == "truncate" else "checksum" in why
    lost = _assert_equals_fresh(spec, fresh)
    _tally(f"corrupt[{target} {how}]", injected=1, recovered=1, bytes_lost=lost,
           note=f"({damaged} bytes damaged; quarantined {[q.name.rsplit('-', 1)[0] for q in quarantined]}: "
                f"{why.strip()!r})")


# ----- 4. two runs of one spec share a cache at the same time --------------------------------------
def test_two_concurrent_runs_compute_each_stage_once(tmp_path: Path, assets: dict, fresh: dict) -> None:
    spec = _spec(tmp_path, assets, "concurrent")
    procs = [_cli(spec, "--output", str(tmp_path / f"out{i}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            _kill_tree(p.pid)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    reports = [json.loads((tmp_path / f"out{i}" / "report.json").read_text()) for i in range(2)]
    for name in reports[0]["stages"]:
        statuses = sorted(r["stages"][name]["status"] for r in reports)
        assert statuses == ["hit", "run"], f"{name}: {statuses}"
    for r in reports:
        assert r["base"] == fresh["base"]
    cache = _cache(spec)
    assert _snapshot(cache) == fresh["snapshot"]
    lost = _bytes_lost(cache, fresh["cache"])
    assert lost == 0
    _verify_all(cache)
    assert list((cache / "staging").iterdir()) == []
    runs = [sorted(n for n, s in r["stages"].items() if s["status"] == "run") for r in reports]
    _tally("concurrent-runs", injected=1, recovered=1, bytes_lost=lost, note=f"(computed by A: {runs[0]}, B: {runs[1]})")


# ----- 5. the disk fills up while a run writes ------------------------------------------------------
# A driver that makes every process of the run (itself and each Ray worker, through Ray's
# worker_process_setup_hook) see a full disk: from the (skip+1)-th mlpfuse.core.artifacts.write_atomic
# call whose path matches FT_ENOSPC_MATCH on, every write_atomic call writes 4 KiB of its temporary
# file and then fails with ENOSPC, as a real full disk would.
ENOSPC_DRIVER = textwrap.dedent('''
    import errno, fcntl, fnmatch, os, sys
    from pathlib import Path

    def inject():
        import mlpfuse.stages.registry  # noqa: F401  (imports every stage module first)
        import mlpfuse.core.artifacts as art
        orig = art.write_atomic
        if getattr(orig, "enospc", False):
            return
        match, skip, log = os.environ["FT_ENOSPC_MATCH"], int(os.environ["FT_ENOSPC_SKIP"]), os.environ["FT_ENOSPC_LOG"]

        def write_atomic(path, writer):
            with open(log, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                lines = f.read().splitlines()
                full = any(x.startswith("FULL ") for x in lines)
                if not full and fnmatch.fnmatch(str(path), match):
                    if sum(x.startswith("MATCH ") for x in lines) >= skip:
                        full = True
                        f.write(f"FULL {path}\\n")
                    else:
                        f.write(f"MATCH {path}\\n")
                if full:
                    f.write(f"FAIL {os.getpid()} {path}\\n")
            if not full:
                return orig(path, writer)

            def partial(tmp):
                Path(tmp).write_bytes(bytes(4096))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

            return orig(path, partial)

        write_atomic.enospc = True
        for mod in list(sys.modules.values()):
            if getattr(mod, "write_atomic", None) is orig:
                mod.write_atomic = write_atomic

    inject()
    import ray
    from mlpfuse.orchestrator.pipeline import RAY_ENV
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"worker_process_setup_hook": inject, "env_vars": dict(RAY_ENV)})
    from mlpfuse.orchestrator.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.parametrize(
    "match,skips",
    [("*/staging/shard-*/layers/*", 12), ("*/manifest.json", 1),
     ("*/staging/collect_part-*/features/*", 24), ("*/report.json", 1)],
    ids=["mid-shard", "first-manifest", "mid-collect", "report"],
)
def test_disk_full_fails_cleanly_and_resumes(match: str, skips: int, tmp_path: Path, assets: dict, fresh: dict,
                                             ray_local) -> None:
    skip = random.Random(f"enospc-{match}").randrange(skips)
    spec = _spec(tmp_path, assets, "enospc")
    cache = _cache(spec)
    log = tmp_path / "enospc.log"
    proc = subprocess.run(
        [sys.executable, "-c", ENOSPC_DRIVER, "run", str(spec)], cwd=ROOT, capture_output=True, text=True,
        timeout=150, env=_env(FT_ENOSPC_MATCH=match, FT_ENOSPC_SKIP=str(skip), FT_ENOSPC_LOG=str(log)),
    )
    failed_at = [x.split(" ", 1)[1] for x in log.read_text().splitlines() if x.startswith("FULL ")]
    assert failed_at, "the disk never filled up"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "No space left on device" in proc.stderr
    errors = [x.strip() for x in proc.stderr.splitlines() if re.match(r"^\s*[\w.]*(Error|Exception)\b", x)]
    last = errors[-1] if errors else proc.stderr.strip().splitlines()[-1]
    # The cache is valid: every committed artifact verifies; nothing half-written is one.
    n_ok = _verify_all(cache)
    # Space is freed; the same command resumes.
    assert main(["run", str(spec)]) == 0
    lost = _assert_equals_fresh(spec, fresh)
    _tally(f"enospc[{match} after {skip}]", injected=1, recovered=1, bytes_lost=lost,
           note=f"(full at {Path(failed_at[0]).relative_to(tmp_path)}; {n_ok} artifacts committed before; "
                f"traceback={'Traceback' in proc.stderr}; CLI's last line: {last!r})")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return r.returncode == 0


@pytest.mark.parametrize("size", ["8m", "13m"])
def test_real_full_tmpfs_fails_cleanly_and_resumes(size: str, tmp_path: Path, assets: dict, fresh: dict,
                                                   ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    """The cache on a real tmpfs too small for the run (the artifacts take ~19 MB): it fails with
    ENOSPC in the stage that fills it; after the tmpfs grows, the same command resumes."""
    mnt = tmp_path / "mnt"
    if os.geteuid() != 0 or not _tmpfs(mnt, size):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        spec = _spec(tmp_path, assets, "tmpfs", cache=str(mnt / "cache"))
        rc = main(["run", str(spec)])
        assert rc == 1
        text = capsys.readouterr().err
        assert "No space left on device" in text, text
        free = subprocess.run(["df", "--output=avail", str(mnt)], capture_output=True, text=True).stdout.split()[-1]
        n_ok = _verify_all(mnt / "cache")
        in_progress = sorted(p.name.split("-")[0] for p in (mnt / "cache" / "staging").iterdir())
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        assert main(["run", str(spec)]) == 0
        lost = _assert_equals_fresh(spec, fresh)
        _tally(f"tmpfs[{size}]", injected=1, recovered=1, bytes_lost=lost,
               note=f"({n_ok} artifacts committed before, in progress {in_progress}, {free} KiB left; "
                    f"the CLI raised {text[:160]!r})")
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ----- 6. security defaults ------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code (the classic ``__reduce__`` attack): it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _tiny_llama_config(path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128).save_pretrained(path)


def test_pickle_payload_in_bin_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     ray_local) -> None:
    import torch

    from mlpfuse.core.errors import CheckpointError
    from mlpfuse.stages import shard

    ckpt, marker = tmp_path / "evil-bin", tmp_path / "PWNED"
    _tiny_llama_config(ckpt)
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, ckpt / "pytorch_model.bin")
    torch.load(ckpt / "pytorch_model.bin", weights_only=False)  # the payload is live...
    assert marker.exists()
    marker.unlink()
    # ...the stage refuses it without running it...
    with pytest.raises(CheckpointError, match="weights_only=True"):
        shard.run(shard.ShardConfig(model=str(ckpt)), {}, tmp_path / "out")
    assert not marker.exists()
    # ...and so does the CLI: exit 2, a message naming the file, nothing cached, nothing run.
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(ckpt), "cache": str(tmp_path / "cache"),
                                    "output": str(tmp_path / "o"), "data": "shakespeare"}))
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "weights_only=True" in err
    assert not marker.exists()
    assert list((tmp_path / "cache" / "artifacts").rglob("manifest.json")) == []
    _tally("pickle-payload", injected=1, note=f"(refused: {err.strip().splitlines()[0][:150]!r})")


def test_checkpoint_code_is_not_run_by_default(tmp_path: Path) -> None:
    """trust_remote_code is off unless the spec opts in; a checkpoint shipping its own modeling code
    (config ``auto_map``) is refused, and the code is never imported."""
    import torch
    from safetensors.torch import save_file

    from mlpfuse.core.errors import CheckpointError
    from mlpfuse.orchestrator.spec import PipelineSpec, ShardSpec
    from mlpfuse.stages import shard

    assert ShardSpec().trust_remote_code is False
    spec = PipelineSpec(model="x")
    assert spec.shard.trust_remote_code is False and spec.shard_config("k").trust_remote_code is False
    assert shard.ShardConfig(model="x").trust_remote_code is False

    ckpt, marker = tmp_path / "evil-code", tmp_path / "PWNED"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "evilarch", "num_hidden_layers": 1,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"},
    }))
    code = f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evilarch'\n"
    (ckpt / "configuration_evil.py").write_text(code)
    (ckpt / "modeling_evil.py").write_text(code)
    save_file({"x": torch.zeros(1)}, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        shard.run(shard.ShardConfig(model=str(ckpt)), {}, tmp_path / "out")
    assert not marker.exists()
    _tally("remote-code", injected=1)


def _pydantic_models(model: type, seen: set[type] | None = None) -> set[type]:
    from pydantic import BaseModel

    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for f in model.model_fields.values():
        for t in [f.annotation, *getattr(f.annotation, "__args__", ())]:
            if isinstance(t, type) and issubclass(t, BaseModel):
                _pydantic_models(t, seen)
    return seen


@pytest.mark.parametrize("doc", [
    "model: x\ncallback: os.system\n",
    "model: x\nshard:\n  callback: os.system\n",
    "model: x\nray:\n  runtime_env: {worker_process_setup_hook: os.system}\n",
    "model: x\nevaluate:\n  hook: 'os:system'\n",
    "model: !!python/object/apply:os.system ['touch {marker}']\n",
    "model: x\ndata: !!python/name:os.system\n",
], ids=["top-level", "shard", "ray-runtime-env", "evaluate", "yaml-apply-tag", "yaml-name-tag"])
def test_spec_cannot_name_code(doc: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               request: pytest.FixtureRequest) -> None:
    from mlpfuse.orchestrator.spec import PipelineSpec

    marker = tmp_path / "PWNED"
    spec = tmp_path / "spec.yaml"
    spec.write_text(doc.replace("{marker}", str(marker)))
    assert main(["run", str(spec), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "unknown key" in err or "not valid YAML" in err, err
    assert not marker.exists()
    assert not (tmp_path / "cache").exists()
    # No model of the spec takes unknown keys, and no field holds an import path or a callable.
    for m in _pydantic_models(PipelineSpec):
        assert m.model_config.get("extra") == "forbid", m
        for name, f in m.model_fields.items():
            assert "ImportString" not in repr(f.annotation) and "Callable" not in repr(f.annotation), (m, name)
    why = next(x.strip() for x in err.splitlines() if "unknown key" in x or "YAML" in x)
    _tally(f"spec-code[{request.node.callspec.id}]", injected=1, note=f"({why[:120]!r})")


def _listeners(procs: list[psutil.Process]) -> dict[str, str]:
    """{"ip:port": process name} of every listening TCP socket and bound UDP socket of ``procs``."""
    out = {}
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                out[f"{c.laddr.ip}:{c.laddr.port}"] = name
    return out


def _loopback(ip: str) -> bool:
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or ip.startswith("127.")


def _watch_listeners(proc: subprocess.Popen, seconds: float) -> dict[str, str]:
    seen: dict[str, str] = {}
    end = time.time() + seconds
    while time.time() < end and proc.poll() is None:
        seen.update(_listeners(_tree(proc.pid)))
        time.sleep(0.2)
    return seen


def _plain_env() -> dict[str, str]:
    """A user's shell: none of the RAY_* settings this suite's conftest exports."""
    env = _env()
    for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE"):
        env.pop(k, None)
    return env


def test_embedded_ray_session_listens_on_loopback_only(tmp_path: Path) -> None:
    code = ("import sys\nfrom mlpfuse.orchestrator.pipeline import ray_session\nwith ray_session(None, 1):\n"
            "    import ray\n    ray.get(ray.remote(lambda: 1).remote())\n    print('UP', flush=True)\n"
            "    sys.stdin.readline()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_plain_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "UP"
        seen = _watch_listeners(proc, 3.0)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    assert len(seen) >= 3, seen  # GCS, raylet, workers...
    exposed = {a: n for a, n in seen.items() if not _loopback(a.rsplit(":", 1)[0])}
    assert exposed == {}, f"listening beyond loopback: {exposed}"
    _tally("ray-session-listeners", note=f"({len(seen)} listeners, all loopback)")


# ----- regressions of bugs found here ------------------------------------------------------------------
def test_fixed_cli_embedded_ray_listens_beyond_loopback(tmp_path: Path, assets: dict) -> None:
    spec = _spec(tmp_path, assets, "listen")
    proc = _cli(spec, env=_plain_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = _watch_listeners(proc, 90.0)
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    assert len(seen) >= 3, seen
    exposed = {a: n for a, n in seen.items() if not _loopback(a.rsplit(":", 1)[0])}
    print(f"\n[faults] listeners of `mlpfuse run` beyond loopback: {exposed}")
    assert exposed == {}, f"listening beyond loopback: {exposed}"


def test_fixed_embedded_ray_joins_a_stale_cluster_address(tmp_path: Path, assets: dict) -> None:
    import shutil
    import tempfile

    rt = Path(tempfile.mkdtemp(prefix="mf-rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (rt / "ray").mkdir()
        (rt / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # a head that is gone
        spec = _spec(tmp_path, assets, "stale")
        proc = _cli(spec, env=_env(RAY_TMPDIR=str(rt)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out = proc.communicate(timeout=150)[0]
        finally:
            _kill_tree(proc.pid)
        errors = [x for x in out.splitlines() if "Error" in x]
        print(f"\n[faults] embedded run with a stale ray_current_cluster: rc={proc.returncode} {errors[-1:]}")
        assert proc.returncode == 0, out[-2000:]
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def test_fixed_collect_part_killed_before_commit_cannot_resume(tmp_path: Path, fresh: dict) -> None:
    from mlpfuse.core.artifacts import file_digest
    from mlpfuse.stages import collect

    def files(d: Path) -> dict[str, str]:
        return {f.relative_to(d).as_posix(): file_digest(f) for f in sorted(d.rglob("*"))
                if f.is_file() and ".parts" not in f.parts}

    arts = fresh["cache"] / "artifacts"
    inputs = {"shard": next((arts / "shard").iterdir()), "data": next((arts / "data").iterdir())}
    cfg = collect.CollectPartConfig(num_workers=2, worker=0)
    out = tmp_path / "staging"
    collect.run_part(cfg, inputs, out)  # finished; the worker dies before store.commit
    done = files(out)
    collect.run_part(cfg, inputs, out)  # Ray's retry of the task, on the same staging dir
    assert files(out) == done


def test_fixed_failed_commit_discards_committed_parts(tmp_path: Path, fresh: dict, assets: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import asdict

    import mlpfuse.core.artifacts
    from mlpfuse.orchestrator.pipeline import build_plan, execute_node
    from mlpfuse.orchestrator.spec import load_spec

    (node,) = [n for n in build_plan(load_spec(_spec(tmp_path, assets, "commit"))) if n.name == "collect.part0"]
    store = str(tmp_path / "store")
    for u, key in node.input_keys.items():  # the inputs, in this test's own store
        shutil.copytree(fresh["cache"] / "artifacts" / u / key, Path(store) / "artifacts" / u / key)
    ups = [{"stage": u, "key": node.input_keys[u]} for u in node.inputs]
    orig = mlpfuse.core.artifacts.write_atomic

    def full_at_manifest(path: Path, writer: object) -> None:
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        orig(path, writer)

    monkeypatch.setattr(mlpfuse.core.artifacts, "write_atomic", full_at_manifest)
    with pytest.raises(OSError):
        execute_node(store, asdict(node), *ups)  # every layer committed as a part; the commit fails
    monkeypatch.setattr(mlpfuse.core.artifacts, "write_atomic", orig)
    r = execute_node(store, asdict(node), *ups)  # space freed: the retry
    assert r["status"] == "run"
    assert r["result"]["layers_resumed_from"] == 12, f"recomputed from layer {r['result']['layers_resumed_from']}"


def test_fixed_stale_collect_artifact_is_used_silently(tmp_path: Path, fresh: dict) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlpfuse.orchestrator.budget import ModelFacts
    from mlpfuse.stages.registry import STAGES

    arts = fresh["cache"] / "artifacts"
    old = tmp_path / "collect-v1"
    shutil.copytree(next((arts / "collect").iterdir()), old)
    for f in (old / "stats").glob("*.safetensors"):  # as collect v1 wrote them before 5c9c77d
        save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("layer/")}, str(f))
    try:
        facts = ModelFacts.read(next((arts / "shard").iterdir()), old)
    except (KeyError, ValueError):
        return  # refused: fine
    assert STAGES["collect"].version > 1 and STAGES["collect_part"].version > 1, (
        f"a v1 collect artifact is still current, and reads as cos={facts.cos}")


def test_fixed_disk_full_message(tmp_path: Path, fresh: dict, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import mlpfuse.core.artifacts

    def full(path: Path, writer: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    spec = Path(fresh["report"]["outputs"]["cache"]).parent / "fresh.yaml"
    monkeypatch.setattr(mlpfuse.core.artifacts, "write_atomic", full)  # everything is cached: only report.json is written
    rc = main(["run", str(spec), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "disk" in err.lower() or "space" in err.lower()


# ----- 2b. the whole run is SIGKILLed inside each stage of a budget run ----------------------------
BUDGET = {
    # The tied form: merge windows and per-layer widths (candidates that keep their first layers
    # whole start from the base model's cached hidden states: the prefix stage).
    "budget": {"target": {"ff_params": 0.7}, "methods": ["prune", "fusion", "moefy", "merge"],
               "halving": {"min_tokens": 64}, "export": "tied"},
    "distill": {"train": {"steps": 6, "lr": 1e-3, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1,
                          "checkpoint_every": 2, "seed": 0}, "max_blocks": 8, "tied": True},
}
# Where the kill lands: a compress candidate of each method (with and without the refit), and
# every later stage of the run.
BUDGET_KILLS = ("compress:prune", "compress:prune+refit", "compress:fusion", "compress:fusion+refit",
                "compress:moefy", "compress:moefy+refit", "compress:merge", "compress:merge+refit",
                "prefix", "probe", "layer_errors", "export", "samples", "distill")


@pytest.fixture(scope="module")
def fresh_budget(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path], ray_local) -> dict:
    """The reference budget run (candidates, prefix, layer errors, export, distillation), uninterrupted."""
    tmp = tmp_path_factory.mktemp("fresh-budget")
    spec = _spec(tmp, assets, "fresh", **BUDGET)
    assert main(["run", str(spec)]) == 0
    report = _report(spec)
    cache = _cache(spec)
    return {"cache": cache, "snapshot": _snapshot(cache), "base": report["base"], "report": report}


def _target(report: dict, kill: str) -> tuple[str, str, float]:
    """(stage, key, seconds in the reference run) of the node a kill aims at."""
    stage, _, method = kill.partition(":")
    for name, r in report["stages"].items():
        if r["stage"] != stage:
            continue
        if method:
            cand = name.removeprefix("compress.")
            family, refit = method.removesuffix("+refit"), method.endswith("+refit")
            if not (cand.startswith(family) and cand.endswith("+refit") == refit):
                continue
        return stage, r["cache_key"], r["seconds"]
    raise AssertionError(f"the reference run has no {kill} node: {sorted(report['stages'])}")


@pytest.mark.faults
@pytest.mark.parametrize("kill", BUDGET_KILLS)
def test_run_sigkill_in_each_budget_stage_resumes(kill: str, tmp_path: Path, assets: dict, fresh_budget: dict,
                                                  ray_local) -> None:
    """``mlpfuse run`` of a budget spec, killed with its Ray at a seeded random moment after the
    aimed-at node's staging directory appears; the re-run recomputes nothing committed and ends
    with every artifact, the export included, byte for byte the uninterrupted run's."""
    stage, key, seconds = _target(fresh_budget["report"], kill)
    delay = random.Random(f"mlpfuse-faults-{kill}").uniform(0.05, 0.95) * max(seconds, 0.05)
    spec = _spec(tmp_path, assets, f"kill-{kill.replace(':', '-').replace('+', '-')}", **BUDGET)
    cache = _cache(spec)
    proc = _cli(spec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    known: list[psutil.Process] = []
    try:
        deadline, scanned = time.time() + 300, 0.0
        while time.time() < deadline and proc.poll() is None:
            if (cache / "staging" / f"{stage}-{key}").exists() or (cache / "artifacts" / stage / key).exists():
                break
            if time.time() - scanned > 0.25:
                known, scanned = _tree(proc.pid), time.time()
            time.sleep(0.002)
        else:
            pytest.fail(f"{kill} never started (exit code {proc.poll()})")
        time.sleep(delay)
    finally:
        n = _kill_tree(proc.pid, known)
        proc.wait()
    committed = {f"{m.parent.parent.name}/{m.parent.name}" for m in (cache / "artifacts").glob("*/*/manifest.json")}
    mid = (cache / "staging" / f"{stage}-{key}").exists()
    FAULTS["kills_mid_stage" if mid else "kills_between_stages"] += 1

    assert main(["run", str(spec)]) == 0
    report = _report(spec)
    for name, r in report["stages"].items():
        was = f"{r['stage']}/{r['cache_key']}" in committed
        assert r["status"] == ("hit" if was else "run"), f"{name}: committed before the kill={was}, {r['status']}"
    lost = _assert_equals_fresh(spec, fresh_budget)
    got = Path(yaml.safe_load(spec.read_text())["output"]) / "export"
    want = Path(fresh_budget["report"]["outputs"]["report"]).parent / "export"
    weights = sorted(f.relative_to(got) for f in got.rglob("*.safetensors"))
    assert weights and weights == sorted(f.relative_to(want) for f in want.rglob("*.safetensors"))
    assert all((got / f).read_bytes() == (want / f).read_bytes() for f in weights)  # the handed-over model
    _verify_all(cache)
    _tally(f"run-sigkill[{kill}]", injected=1, recovered=1, bytes_lost=lost,
           note=f"(delay {delay:.3f}s, {'mid-stage' if mid else 'after its commit'}, {n} processes killed)")
