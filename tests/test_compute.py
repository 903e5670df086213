"""Where a stage computes: the precision rule, the Ray options each stage task asks for, and the
bf16 compute path (the code a GPU task runs) on real SmolLM2 weights, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlpfuse.core.compute import Compute, current_compute, use_compute
from mlpfuse.orchestrator.pipeline import Session
from mlpfuse.orchestrator.spec import GPU_STAGES, SpecError, parse_spec
from mlpfuse.orchestrator.store import ArtifactStore
from mlpfuse.stages.model.runner import LayerStreamedModel
from mlpfuse.stages.registry import STAGES


def test_precision_rule() -> None:
    bf16, f32 = torch.bfloat16, torch.float32
    assert Compute("cpu", "auto").dtype(bf16) == f32  # CPUs: float32, as always
    assert Compute("cuda", "auto").dtype(bf16) == bf16  # a GPU: the stored precision
    assert Compute("cuda", "auto").dtype(f32) == f32
    assert Compute("cpu", "bfloat16").dtype(f32) == bf16  # asked for explicitly
    assert current_compute() == Compute()
    with use_compute(Compute("cpu", "float16")):
        assert current_compute().precision == "float16"
    assert current_compute() == Compute()
    with pytest.raises(ValueError, match="precision"), use_compute(Compute("cpu", "int8")):
        pass


def _session(tmp_path: Path, gpus_in_cluster: bool, **resources: object) -> Session:
    spec = parse_spec({"model": "x", "cache": str(tmp_path), "resources": resources,
                       "budget": {"target": {"params": 0.8}},
                       "distill": {"train": {"steps": 1, "lr": 1e-3, "micro_batch": 1, "grad_accum": 1,
                                             "checkpoint_every": 1, "seed": 0}, "max_blocks": 1, "workers": 2}})
    s = Session(spec, ArtifactStore(tmp_path))
    want = spec.resources.gpus
    s._gpus = (1.0 if gpus_in_cluster else 0.0) if want == "auto" else float(want)
    return s


def test_gpu_stages_ask_for_a_gpu_only_when_the_cluster_has_one(tmp_path: Path) -> None:
    on_cpus, on_gpus = _session(tmp_path, False), _session(tmp_path, True)
    for stage in STAGES:
        opts, compute = on_cpus.task_options(stage, 8)
        assert "num_gpus" not in opts and compute["gpus"] == 0  # CPU clusters: as before
        opts, compute = on_gpus.task_options(stage, 8)
        if stage == "distill":  # two Ray Train workers hold the GPUs; the task only coordinates
            assert opts["num_cpus"] == 0 and "num_gpus" not in opts and compute["gpus"] == 1
            assert compute["worker_cpus"] == 1
        elif stage in GPU_STAGES:
            assert opts["num_gpus"] == 1 and compute["gpus"] == 1
        else:
            assert "num_gpus" not in opts, stage  # shard, data, collect's merge, export
    pinned = _session(tmp_path, True, gpus=0.5, stages={"collect_part": {"cpus": 4, "gpus": 2, "custom": {"big": 1}},
                                                         "shard": {"custom": {"disk": 0.5}}})
    opts, _ = pinned.task_options("collect_part", 8)
    assert opts == {"num_cpus": 4, "num_gpus": 2, "resources": {"big": 1}, "max_retries": 2}
    assert pinned.task_options("evaluate", 8)[0]["num_gpus"] == 0.5
    assert pinned.task_options("shard", 8)[0]["resources"] == {"disk": 0.5}


def test_resources_are_checked_and_stay_out_of_cache_keys(tmp_path: Path) -> None:
    from mlpfuse.orchestrator.pipeline import build_plan

    with pytest.raises(SpecError, match="unknown stage 'colect'; did you mean 'collect'"):
        parse_spec({"model": "x", "resources": {"stages": {"colect": {"cpus": 1}}}})
    with pytest.raises(SpecError, match="resources.gpus"):
        parse_spec({"model": "x", "resources": {"gpus": -1}})
    with pytest.raises(SpecError, match="resources.precision"):
        parse_spec({"model": "x", "resources": {"precision": "int4"}})
    base = parse_spec({"model": "smollm2-135m"})
    other = parse_spec({"model": "smollm2-135m", "resources": {"gpus": 2, "precision": "bfloat16"}})
    assert [n.key for n in build_plan(base)] == [n.key for n in build_plan(other)]


def test_bf16_compute_path_keeps_smollm2_perplexity(smollm2_shard: Path, tmp_path: Path) -> None:
    """The bf16 forward passes (what a GPU task runs on a bf16 checkpoint) score SmolLM2's held-out
    Shakespeare within 0.5 % of float32."""
    from mlpfuse.stages import data, evaluate

    d = tmp_path / "data"
    d.mkdir()
    data.run(data.TokenizeConfig(corpus="shakespeare", block_size=128, calib_tokens=256, eval_tokens=2048),
             {"shard": smollm2_shard}, d)
    ev = evaluate.EvaluateConfig(window=256, stride=256, max_tokens=2048)
    f32 = evaluate.evaluate_model(smollm2_shard, d, ev)["perplexity"]
    with use_compute(Compute("cpu", "bfloat16")):
        assert LayerStreamedModel(smollm2_shard).dtype == torch.bfloat16
        b16 = evaluate.evaluate_model(smollm2_shard, d, ev)["perplexity"]
    print(f"\n[bf16] SmolLM2 held-out perplexity: float32 {f32:.4f}, bf16 {b16:.4f} ({b16 / f32 - 1:+.3%})")
    assert b16 != f32 and abs(b16 / f32 - 1) < 0.005
