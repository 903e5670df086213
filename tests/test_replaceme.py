"""ReplaceMe layer drop (``layer_drop`` with ``linear_map``): the fitted map is folded into the
layer before each dropped run exactly, it is the least-squares map, and on SmolLM2 it beats
dropping the same layers plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlpfuse.core.errors import InputError
from mlpfuse.stages import compress, data, evaluate, shard
from mlpfuse.stages.compress import CompressConfig
from mlpfuse.stages.data import corpus_key
from mlpfuse.stages.methods.base import BuildContext
from mlpfuse.stages.methods.drop import (
    LayerDropMethod,
    contiguous_runs,
    drop_layers,
    ff_output_module,
    fit_linear_maps,
)
from mlpfuse.stages.model.overlay import load_overrides
from mlpfuse.stages.model.runner import LayerStreamedModel
from tests.conftest import TINY_CONFIGS
from tests.test_collect import _data

CAUSAL = [m for m in TINY_CONFIGS if m != "bert"]


def test_contiguous_runs() -> None:
    assert contiguous_runs([]) == []
    assert contiguous_runs([1, 2, 3, 5, 7, 8]) == [(1, 3), (5, 5), (7, 8)]


def _hidden_after(model: LayerStreamedModel, ids: torch.Tensor, stop: int) -> torch.Tensor:
    (s,) = model.run([model.start(ids)], stop=stop)
    return s.hidden.float()


@pytest.mark.parametrize("model_type", CAUSAL)
def test_the_map_is_folded_exactly_or_refused(model_type: str, tiny_checkpoints: dict[str, Path],
                                              tmp_path: Path) -> None:
    """Where the family adds its FF output to the residual stream as it is (dense and MoE: every
    expert's down projection takes the map), the model with the last layer dropped and the map
    folded into layer 0 outputs L₀ − M + M T; elsewhere the build refuses, naming the family."""
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[model_type])), {}, sd)
    n = json.loads((sd / "config.json").read_text()).get("num_hidden_layers") or 2
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    dd = _data(tmp_path, n_blocks=8, block=16, vocab=vocab)
    ctx = BuildContext(sd, None, dd)
    m = LayerDropMethod(layers=[1], linear_map=True, map_lam=0.0)
    try:
        ov = drop_layers(m, ctx)
    except InputError as e:
        assert model_type.startswith("gemma3"), e  # a norm after the FF output
        assert "gemma" in str(e) and "linear_map" in str(e)
        return
    assert ov.skip == {1} and set(ov.blocks) == {0}
    assert {r.name for r in ov.blocks[0]} == {r.name for r in ctx.refs(0)}  # every expert takes it
    (t,) = fit_linear_maps(BuildContext(sd, None, dd), [(1, 1)], 0.0)
    out = tmp_path / "ov"
    compress.run(CompressConfig.model_validate({"candidate": m.model_dump()}), {"shard": sd, "data": dd}, out)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    base = LayerStreamedModel(sd)
    mods: list[torch.Tensor] = []
    with base.layer(0) as layer:
        h = layer.get_submodule(ff_output_module(ctx, 0)).register_forward_hook(
            lambda _m, _a, o: mods.append((o[0] if isinstance(o, tuple) else o).detach().float()))
        try:
            l0 = _hidden_after(base, ids, 1)
        finally:
            h.remove()
    m0 = mods[0].reshape(l0.shape)  # some families flatten tokens inside the layer
    want = l0 - m0 + (m0.double() @ t).float()
    got = _hidden_after(LayerStreamedModel(sd, overrides=load_overrides(out)), ids, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert n >= 2


def test_a_run_from_layer_zero_and_no_tokens_are_refused(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, sd)
    dd = _data(tmp_path, n_blocks=4, block=16, vocab=128)
    with pytest.raises(InputError, match="layer 0"):
        drop_layers(LayerDropMethod(layers=[0, 1], linear_map=True), BuildContext(sd, None, dd))
    with pytest.raises(InputError, match="calibration tokens"):
        drop_layers(LayerDropMethod(layers=[1], linear_map=True), BuildContext(sd, None, None))


def test_replaceme_beats_plain_layer_drop_on_smollm2(smollm2_shard: Path, tmp_path: Path) -> None:
    """The same four contiguous layers of SmolLM2-135M dropped, with and without the fitted map:
    the map lowers held-out perplexity (both against the base model's)."""
    dd = tmp_path / "data"
    data.run(data.TokenizeConfig(corpus="shakespeare", corpus_key=corpus_key("shakespeare"), block_size=256,
                                 calib_tokens=4096, eval_tokens=1024), {"shard": smollm2_shard}, dd)
    ev = evaluate.EvaluateConfig(window=256, stride=128)
    ppl = {}
    for name, mapped in (("plain", False), ("map", True)):
        out = tmp_path / name
        cfg = CompressConfig.model_validate({"candidate": {"method": "layer_drop", "layers": [20, 21, 22, 23],
                                                           "linear_map": mapped}})
        compress.run(cfg, {"shard": smollm2_shard, "data": dd}, out)
        ppl[name] = evaluate.run(ev, {"shard": smollm2_shard, "data": dd, "overlay": out}, tmp_path / f"e{name}")["perplexity"]
    base = evaluate.evaluate_model(smollm2_shard, dd, ev)["perplexity"]
    assert base < ppl["map"] < ppl["plain"], (base, ppl)


def test_the_planner_offers_the_map_only_where_it_folds(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from mlpfuse.stages.methods.drop import map_foldable

    got = {}
    for mt in ("llama", "mixtral", "gemma3_text", "bert"):
        sd = tmp_path / mt
        shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
        got[mt] = map_foldable(sd)
    assert got == {"llama": True, "mixtral": True, "gemma3_text": False, "bert": False}
