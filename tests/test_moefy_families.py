"""MLPMoE's unpruned transform is exact end to end: for every supported family (dense, GLU and
non-GLU, and per expert inside MoE models), the model with every FF block split into static
branches and summed back gives the dense model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlpfuse.stages import compress, shard
from mlpfuse.stages.model.overlay import load_overrides
from mlpfuse.stages.model.runner import LayerStreamedModel
from tests.conftest import TINY_CONFIGS

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(shard_dir: Path, overlay: Path | None) -> torch.Tensor:
    lm = LayerStreamedModel(shard_dir, overrides=load_overrides(overlay))
    return lm.logits(IDS)


@pytest.mark.parametrize("mt", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("assignment", ["contiguous", "importance"])
def test_unpruned_moefy_reproduces_the_model(mt: str, assignment: str, tiny_checkpoints: dict[str, Path],
                                             tmp_path: Path) -> None:
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
    ov = tmp_path / "moefy"
    ov.mkdir()
    cfg = compress.CompressConfig.model_validate(
        {"candidate": {"method": "moefy", "branches": 4, "assignment": assignment, "op": "compensated",
                       "keep_branches": 1.0}})
    result = compress.run(cfg, {"shard": sd}, ov)
    assert result["changed_layers"]  # every layer's FF blocks were rewritten
    base, moe = _logits(sd, None), _logits(sd, ov)
    err = float((moe - base).norm() / base.norm())
    assert err <= 1e-5, f"{mt}: relative logit error {err:.2e}"


def test_unpruned_moefy_keeps_smollm2_perplexity(smollm2_shard: Path, tmp_path: Path) -> None:
    """Real SmolLM2-135M weights, held-out Shakespeare: the paper's claim is a change < 0.05 %."""
    from mlpfuse.stages import data, evaluate

    d, ov = tmp_path / "data", tmp_path / "moefy"
    d.mkdir()
    ov.mkdir()
    data.run(data.TokenizeConfig(corpus="shakespeare", block_size=128, calib_tokens=256, eval_tokens=1024),
             {"shard": smollm2_shard}, d)
    cfg = compress.CompressConfig.model_validate(
        {"candidate": {"method": "moefy", "branches": 8, "assignment": "importance", "op": "compensated",
                       "keep_branches": 1.0}})
    compress.run(cfg, {"shard": smollm2_shard}, ov)
    ev = evaluate.EvaluateConfig(window=256, stride=256, max_tokens=1024)
    base = evaluate.evaluate_model(smollm2_shard, d, ev)["perplexity"]
    moe = evaluate.evaluate_model(smollm2_shard, d, ev, overrides=load_overrides(ov))["perplexity"]
    assert abs(moe / base - 1) < 5e-4, (base, moe)


def test_activation_assignment_removes_the_lowest_energy_branches(tiny_checkpoints: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """``assignment: activation`` bands neurons by collect's E[h²]·‖W_out col‖²: keeping 3 of 4
    branches keeps exactly the neurons activation-aware pruning keeps at 3/4."""
    import json

    from safetensors.torch import load_file

    from tests.test_collect import _collect, _data

    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, sd)
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    col = _collect(sd, _data(tmp_path, n_blocks=4, block=16, vocab=vocab), tmp_path / "c", workers=1)
    outs = {}
    for name, cand in (("moefy", {"method": "moefy", "branches": 4, "assignment": "activation", "op": "compensated",
                                  "keep_branches": 0.75, "compensate": False}),
                       ("prune", {"method": "prune", "criterion": "activation", "ratio": 0.75})):
        out = tmp_path / name
        out.mkdir()
        compress.run(compress.CompressConfig.model_validate({"candidate": cand}), {"shard": sd, "collect": col}, out)
        meta = json.loads((out / "overlay.json").read_text())
        outs[name] = load_file(str(out / meta["layers"]["0"]["patch"]))
    for k, v in outs["prune"].items():
        torch.testing.assert_close(outs["moefy"][k], v)


@pytest.mark.parametrize("mt, op", [("llama", "compensated"), ("gpt2", "fade"), ("qwen2_moe", "compensated")])
def test_static_moe_inspection_form_equals_the_exported_block(mt: str, op: str, tiny_checkpoints: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """The candidate's branch map + the base weights rebuild the static MoE (branches, gains α),
    and its output is the pruned plain block's the candidate exports."""
    from safetensors.torch import load_file

    from mlpfuse.core.errors import InputError

    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
    ov = tmp_path / "moefy"
    ov.mkdir()
    cand = {"method": "moefy", "branches": 4, "assignment": "importance", "op": op, "keep_branches": 0.5,
            "sparsity": 0.4, "layers": [1]}
    compress.run(compress.CompressConfig.model_validate({"candidate": cand}), {"shard": sd}, ov)
    ctx = compress.BuildContext(sd, None)
    patched = {**ctx.state(1), **load_overrides(ov)[1].tensors}
    x = torch.randn(7, ctx.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for ref in ctx.family.ff_blocks(ctx.config, patched):
        moe = compress.static_moe(ov, sd, 1, ref.name)
        assert moe.num_branches >= 1 and moe.intermediate_size < ctx.blocks(1)[ref].intermediate_size
        if op == "compensated":
            assert moe.num_branches == 2 and (moe.alpha.detach() != 1).any()  # survivors rescaled
        exported = ctx.family.read_ff(ctx.config, patched, ref).to(torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(moe(x), exported.forward(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="not transformed"):
        compress.static_moe(ov, sd, 0)
    assert set(load_file(str(ov / compress.BRANCHES))) == {
        f"L00001/{r.name}/{k}" for r in ctx.family.ff_blocks(ctx.config, patched) for k in ("branch", "alpha")}
