"""Distillation across Ray Train workers, started by ``mlpfuse run`` itself (``distill.workers``):
CPU workers, gloo, DeepSpeed ZeRO-2 and ZeRO-3. Opt-in (``-m cluster``): each Ray Train run
starts its own worker processes.

Worker r of W takes micro-batch ((s*g + j)*W + r): two workers with grad_accum 1 see the same
micro-batches per step as one process with grad_accum 2, and DeepSpeed averages the same
gradients, so their losses agree to float rounding (the all-reduce sums in another order).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlpfuse.orchestrator.cli import main
from mlpfuse.orchestrator.store import ArtifactStore
from mlpfuse.stages.model.trainer import PROGRESS_FILE

pytestmark = pytest.mark.cluster


def _spec(tmp: Path, model: Path, cache: Path, out: str, train: dict, workers: int) -> Path:
    spec = {
        "name": out, "model": str(model), "cache": str(cache), "output": str(tmp / out),
        "data": {"corpus": "shakespeare", "block_size": 64, "calib_tokens": 1024, "eval_tokens": 256},
        "evaluate": {"window": 64, "stride": 64},
        "budget": {"target": {"ff_params": 0.7}, "methods": ["prune"], "refit": None, "layer_errors": False,
                   "halving": {"min_tokens": 10**6}},
        "distill": {"train": {"lr": 1e-3, "micro_batch": 2, "seed": 0, **train}, "max_blocks": 16,
                    "workers": workers},
    }
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _distilled(tmp: Path, out: str) -> tuple[dict, dict[str, torch.Tensor]]:
    rep = json.loads((tmp / out / "report.json").read_text())
    store = ArtifactStore(rep["outputs"]["cache"])
    art = store.get("distill", rep["stages"]["distill"]["cache_key"])
    assert art is not None
    weights: dict[str, torch.Tensor] = {}
    for f in sorted((art.path / "model").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return art.manifest["result"], weights


@pytest.mark.parametrize("zero", [2, 3])
def test_two_workers_reach_the_single_process_loss(tiny_lm: Path, tmp_path: Path, ray_local, zero: int) -> None:
    cache = tmp_path / "cache"
    train = {"steps": 4, "zero_stage": zero, "checkpoint_every": 2}
    assert main(["run", str(_spec(tmp_path, tiny_lm, cache, "one", {**train, "grad_accum": 2}, 1))]) == 0
    assert main(["run", str(_spec(tmp_path, tiny_lm, cache, "two", {**train, "grad_accum": 1}, 2))]) == 0
    one, w1 = _distilled(tmp_path, "one")
    two, w2 = _distilled(tmp_path, "two")
    assert (one["workers"], two["workers"]) == (1, 2) and two["tokens"] == one["tokens"]
    assert len(two["losses"]) == len(one["losses"]) == 4
    rel = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
    wdiff = max(float((w2[k].double() - w1[k].double()).abs().max()) for k in w1)
    print(f"\n[distill ZeRO-{zero}] 2 Ray Train workers vs 1 process: losses {two['losses']} vs "
          f"{one['losses']}; largest relative loss difference {rel:.2e}; largest weight difference {wdiff:.2e}")
    assert rel <= 1e-4


def _ray_train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            out.append(p)
    return out


def test_a_killed_worker_resumes_from_its_checkpoint(tiny_lm: Path, tmp_path: Path, ray_local) -> None:
    """SIGKILL one Ray Train worker once the first checkpoints are written: Ray Train restarts the
    worker group, the workers resume from the last checkpoint, and the distilled weights equal an
    uninterrupted run's."""
    train = {"steps": 24, "zero_stage": 2, "checkpoint_every": 4, "grad_accum": 1}
    ref = tmp_path / "ref"
    ref.mkdir()
    assert main(["run", str(_spec(ref, tiny_lm, ref / "cache", "out", train, 2))]) == 0
    want_result, want = _distilled(ref, "out")

    run = tmp_path / "run"
    run.mkdir()
    spec = _spec(run, tiny_lm, run / "cache", "out", train, 2)
    staging = run / "cache" / "staging"
    killed: list[int] = []
    stop = threading.Event()

    def kill_after_a_checkpoint() -> None:
        while not stop.is_set():
            for progress in staging.glob(f"distill-*/checkpoints/{PROGRESS_FILE}"):
                try:
                    done = json.loads(progress.read_text())["steps_done"]
                except (OSError, ValueError, KeyError):
                    continue
                if 4 <= done < 20 and not killed:
                    workers = _ray_train_workers()
                    if workers:
                        workers[-1].kill()
                        killed.append(done)
                        return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    watcher.start()
    try:
        assert main(["run", str(spec)]) == 0
    finally:
        stop.set()
        watcher.join(5)
    got_result, got = _distilled(run, "out")
    print(f"\n[distill] worker killed after step {killed}; resumed from {got_result['resumed_from']}")
    assert killed, "the run ended before a worker could be killed"
    assert got_result["resumed_from"] is not None and got_result["resumed_from"] >= 4
    assert got_result["losses"] == want_result["losses"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    shutil.rmtree(tmp_path, ignore_errors=True)
