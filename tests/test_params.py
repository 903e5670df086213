"""One parameter count for the planner, compress and export: a candidate's size predicted from its
settings (before anything is built) equals what compress built and what export stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlpfuse.stages import compress, export, shard
from mlpfuse.stages.methods import METHODS, predict_shapes
from mlpfuse.stages.model.params import BlockShape, base_blocks, count_params, recount

# Data-free settings (no collect artifact needed), every method family that can be predicted.
CANDIDATES = [
    {"candidate": {"method": "prune", "criterion": "magnitude", "ratio": 0.5}},
    {"candidate": {"method": "prune", "criterion": "random", "keep": 7, "layers": [0]}},
    {"candidate": {"method": "fusion", "ratio": 0.25, "iters": 3}},
    {"candidate": {"method": "moefy", "branches": 4, "op": "fade", "sparsity": 0.3}},
    {"candidate": {"method": "moefy", "branches": 4, "op": "compensated", "keep_branches": 0.5}},
    {"candidate": {"method": "ff_drop", "layers": [1]}},
    {"candidate": {"method": "layer_drop", "layers": [0]}},
    {"candidate": {"method": "prune", "criterion": "magnitude", "ratio": 0.5, "layers": [1]}, "drop": [0]},
]


def test_block_shape_counts_like_the_tensors() -> None:
    b = BlockShape("intermediate_size", 10, per_neuron=3 * 8 + 1, const=8)
    assert b.params == 10 * 25 + 8 and b.resized(4).params == 4 * 25 + 8
    base = {"layers": [500, 500], "ff_layers": [258, 258], "rest": 100}
    blocks = {0: [b], 1: [b.resized(4)]}
    c = count_params(base, blocks, skip=set(), tied=[])
    # Stock: both layers at the widest width; 6 padded neurons in layer 1.
    assert c["ff_params"] == 2 * 258 and c["padded_params"] == 6 * 25
    assert c["params"] == 100 + 2 * (500 - 258) + 2 * 258
    tied = count_params(base, {0: [b], 1: [b]}, skip=set(), tied=[[0, 1]])
    assert tied["unique_ff_params"] == 258 and tied["params"] - tied["unique_params"] == 258
    dropped = count_params(base, blocks, skip={1}, tied=[])
    assert dropped["params"] == 100 + 500 and dropped["padded_params"] == 0


@pytest.mark.parametrize("mt", ["llama", "gpt2", "mixtral", "qwen2_moe"])
def test_predicted_equals_built_equals_exported(mt: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """For every predictable method: the count from the settings alone equals compress's count of
    what it built; both export forms store exactly what is counted for them (the stock form padded
    to one width per config field, the tied form at each layer's own widths, MoE experts aligned
    per layer), and the tied form loads with that many parameters and the stock form's outputs."""
    import torch

    import mlpfuse

    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
    shapes = base_blocks(sd)
    base = json.loads((sd / "shard.json").read_text())["params"]
    mult = shapes.multiples(dtype=torch.float32)
    assert (mult == {}) == (not shapes.moe_layers) and all(v == 4 for v in mult.values())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    predicted_any = 0
    for k, spec in enumerate(CANDIDATES):
        cfg = compress.CompressConfig.model_validate(spec)
        out = tmp_path / f"c{k}"
        out.mkdir()
        built = compress.run(cfg, {"shard": sd}, out)
        predicted = predict_shapes(cfg.candidate, cfg.drop, shapes.blocks, shapes.moe_layers)
        if predicted is None:
            continue
        predicted_any += 1
        plain = count_params(base, *predicted)
        for key in ("params", "unique_params", "ff_params", "unique_ff_params", "padded_params"):
            assert plain[key] == built[key], (spec, key, plain[key], built[key])
        counts = count_params(base, *predicted, size_multiple=mult)
        assert recount(base, shapes, built, mult) == counts
        if k in (1, 3, 6):  # per-layer widths, an MLPMoE width, dropped layers
            stock = export.run(export.ExportConfig(), {"shard": sd, "overlay": out}, tmp_path / f"s{k}")
            tied = export.run(export.ExportConfig(tied=True), {"shard": sd, "overlay": out}, tmp_path / f"t{k}")
            assert stock["stored_params"] == stock["params"] == counts["params"]
            assert tied["stored_params"] == tied["unique_params"] == counts["unique_params"]
            loaded = mlpfuse.load(Path(tied["path"]))
            assert sum(p.numel() for p in loaded.parameters()) == counts["unique_params"]
            want = mlpfuse.load(Path(stock["path"]))(ids).logits
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert predicted_any >= 6
    assert {"prune", "fusion", "moefy", "ff_drop", "layer_drop"} <= {
        m for m, d in METHODS.items() if d.width is not None or d.build_model is not None}
