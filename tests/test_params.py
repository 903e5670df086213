"""One parameter count for the planner, compress and export: a candidate's size predicted from its
settings (before anything is built) equals what compress built and what export stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlpfuse.stages import compress, export, shard
from mlpfuse.stages.methods import METHODS, predict_shapes
from mlpfuse.stages.model.params import BlockShape, base_blocks, count_params

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
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
    blocks, moe = base_blocks(sd)
    base = json.loads((sd / "shard.json").read_text())["params"]
    predicted_any = 0
    for k, spec in enumerate(CANDIDATES):
        cfg = compress.CompressConfig.model_validate(spec)
        out = tmp_path / f"c{k}"
        out.mkdir()
        built = compress.run(cfg, {"shard": sd}, out)
        shapes = predict_shapes(cfg.candidate, cfg.drop, blocks, moe)
        if shapes is None:
            continue
        predicted_any += 1
        counts = count_params(base, *shapes)
        for key in ("params", "unique_params", "ff_params", "unique_ff_params", "padded_params"):
            assert counts[key] == built[key], (spec, key, counts[key], built[key])
        if k in (0, 6):  # the export stores what was counted
            ex = export.run(export.ExportConfig(moe_size_multiple=1), {"shard": sd, "overlay": out}, tmp_path / f"e{k}")
            assert ex["params"] == counts["params"] == ex["stored_params"]
    assert predicted_any >= 6
    assert {"prune", "fusion", "moefy", "ff_drop", "layer_drop"} <= {
        m for m, d in METHODS.items() if d.width is not None or d.build_model is not None}
