"""FF merging of MoE layers: whole MoE blocks tied across a window, experts matched one-to-one.

The invariant: when layer 1's MoE block is layer 0's with its experts shuffled (router rows
with them) and every expert's neurons shuffled, the two blocks are the same function; aligned
merging must recover layer 0's block exactly, so the merged model reproduces the original, while
merging by index (vanilla) does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mlpfuse
from mlpfuse.stages import compress, export, shard
from mlpfuse.stages.model.hf import TIES_FILE
from mlpfuse.stages.model.overlay import load_overrides
from mlpfuse.stages.model.runner import LayerStreamedModel
from mlpfuse.stages.model.shards import layer_file
from tests.conftest import TINY_CONFIGS
from tests.test_collect import _collect, _data

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _permuted_copy(model_type: str, path: Path) -> Path:
    """A tiny MoE model whose layer 1 MoE block is a shuffled copy of layer 0's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(3)
    src, dst = model.model.layers[0].mlp, model.model.layers[1].mlp
    with torch.no_grad():
        e_count, two_i, _ = src.experts.gate_up_proj.shape
        n = two_i // 2
        ep = torch.randperm(e_count, generator=g)  # dst expert f is src expert ep[f]
        for f in range(e_count):
            p = torch.randperm(n, generator=g)
            gate, up = src.experts.gate_up_proj[ep[f]].chunk(2, 0)
            dst.experts.gate_up_proj[f] = torch.cat([gate[p], up[p]], 0)
            dst.experts.down_proj[f] = src.experts.down_proj[ep[f]][:, p]
        dst.gate.weight.copy_(src.gate.weight[ep])
        if hasattr(src, "shared_expert"):
            p = torch.randperm(src.shared_expert.up_proj.weight.shape[0], generator=g)
            dst.shared_expert.up_proj.weight.copy_(src.shared_expert.up_proj.weight[p])
            dst.shared_expert.gate_proj.weight.copy_(src.shared_expert.gate_proj.weight[p])
            dst.shared_expert.down_proj.weight.copy_(src.shared_expert.down_proj.weight[:, p])
            dst.shared_expert_gate.weight.copy_(src.shared_expert_gate.weight)
    assert not torch.equal(ep, torch.arange(e_count))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_copy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(f"merge-{request.param}")
    sd = root / "shard"
    shard.run(shard.ShardConfig(model=str(_permuted_copy(request.param, root / "model"))), {}, sd)
    col = _collect(sd, _data(root, n_blocks=8, block=32, vocab=128), root / "c", workers=1)
    return {"shard": sd, "collect": col, "root": root}


def build_merge(env: dict, name: str, **kw: object) -> tuple[Path, dict]:
    out = env["root"] / name
    out.mkdir()
    refit = kw.pop("refit", None)
    cand = {"method": "merge", "start": 0, "size": 2, **kw}
    cfg = compress.CompressConfig.model_validate({"candidate": cand, "refit": refit})
    return out, compress.run(cfg, {"shard": env["shard"], "collect": env["collect"]}, out)


def _logits(shard_dir: Path, overlay: Path | None) -> torch.Tensor:
    lm = LayerStreamedModel(shard_dir, overrides=load_overrides(overlay))
    lm.model.set_experts_implementation("eager")
    return lm.logits(IDS)


def test_aligned_merge_of_a_shuffled_copy_reproduces_the_model(moe_copy: dict) -> None:
    base = _logits(moe_copy["shard"], None)
    out, res = build_merge(moe_copy, "aligned")
    meta = json.loads((out / "overlay.json").read_text())
    assert meta["tied"] == [[0, 1]] and meta["layers"]["0"]["patch"] == meta["layers"]["1"]["patch"]
    # The one stored patch is layer 0's MoE block itself (router included): nothing was averaged away.
    with safe_open(str(out / meta["layers"]["0"]["patch"]), framework="pt") as f, \
            safe_open(str(moe_copy["shard"] / layer_file(0)), framework="pt") as b:
        keys = set(f.keys())
        assert "mlp.gate.weight" in keys and "mlp.experts.gate_up_proj" in keys
        for k in keys:
            torch.testing.assert_close(f.get_tensor(k), b.get_tensor(k), atol=1e-6, rtol=1e-5)
    got = _logits(moe_copy["shard"], out)
    assert (got - base).abs().max().item() <= 1e-5
    # The unique count stores the tied patch (experts, shared expert, router) once.
    patch = load_overrides(out)[0].tensors
    assert res["params"] - res["unique_params"] == sum(patch[k].numel() for k in patch)

    vanilla, _ = build_merge(moe_copy, "vanilla", permute=False)
    assert (_logits(moe_copy["shard"], vanilla) - base).abs().max().item() > 1e-3


def test_tied_export_shares_the_whole_moe_block(moe_copy: dict) -> None:
    out, res = build_merge(moe_copy, "export-src")
    r = export.run(export.ExportConfig(tied=True), {"shard": moe_copy["shard"], "overlay": out},
                   moe_copy["root"] / "export")
    assert r["unique_params"] == res["unique_params"]
    model = mlpfuse.load(Path(r["path"]))
    a, b = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert a.gate.weight is b.gate.weight and a.experts.down_proj is b.experts.down_proj
    assert model.num_parameters() == res["unique_params"]


def test_refit_of_a_merged_moe_window_fits_each_layers_matched_experts(moe_copy: dict) -> None:
    """The refit pairs each merged expert with the original expert it stands for in each layer:
    on the shuffled copy the merge is already exact, so the fit stays exact (errors ~0)."""
    out, res = build_merge(moe_copy, "refit", refit={"lam": 0.0})
    errs = res["refit_errors"]
    assert errs["layers"] == [0, 1]
    assert max(errs["before"]) < 1e-8 and max(errs["after"]) < 1e-8


def test_budget_merges_moe_windows_end_to_end(smollm2_tokenizer: Path, tmp_path: Path, ray_local) -> None:
    """The planner's merge windows on a Qwen2-MoE model (real tokenizer, Shakespeare): every window
    is built, scored and exported in the tied form, which loads with its MoE blocks shared."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlpfuse.orchestrator.cli import main

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    kw = {**TINY_CONFIGS["qwen2_moe"], "num_hidden_layers": 4, "vocab_size": 49152, "tie_word_embeddings": True}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2_moe", **kw)).save_pretrained(model_dir)
    for f in smollm2_tokenizer.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    spec = {
        "name": "moe-merge", "model": str(model_dir), "cache": str(tmp_path / "cache"), "output": str(tmp_path / "out"),
        "data": {"corpus": "shakespeare", "block_size": 64, "calib_tokens": 512, "eval_tokens": 256},
        "evaluate": {"window": 64, "stride": 64},
        "budget": {"target": {"ff_params": 0.76}, "methods": ["merge"], "export": "tied", "refit": None,
                   "halving": {"min_tokens": 64}},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "spec.yaml")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    names = {c["name"] for c in rep["candidates"]}
    assert {"merge-0-1", "merge-0-1-vanilla", "merge-1-2", "merge-2-3"} <= names
    assert rep["winner"]["name"].startswith("merge")
    model = mlpfuse.load(tmp_path / "out" / "export")
    (a, b) = next(w for w in json.loads((tmp_path / "out" / "export" / TIES_FILE).read_text())["windows"])
    la, lb = model.model.layers[a].mlp, model.model.layers[b].mlp
    assert la.experts.gate_up_proj is lb.experts.gate_up_proj and la.gate.weight is lb.gate.weight
    assert model.num_parameters() == rep["winner"]["params"]


def test_aligned_moe_merge_without_recorded_inputs_is_a_clear_error(moe_copy: dict) -> None:
    from mlpfuse.core.errors import InputError

    root = moe_copy["root"] / "noinputs"
    root.mkdir()
    col = _collect(moe_copy["shard"], _data(root, n_blocks=2, block=16, vocab=128), root / "c", workers=1, inputs=False)
    out = root / "ov"
    out.mkdir()
    cfg = compress.CompressConfig.model_validate({"candidate": {"method": "merge", "start": 0, "size": 2}})
    with pytest.raises(InputError, match="collect.inputs: true"):
        compress.run(cfg, {"shard": moe_copy["shard"], "collect": col}, out)
