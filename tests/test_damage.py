"""The damage stage (each layer's cost, compressed alone at every width and dropped) and the
planner's allocation of a budget over the layers from it."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mlpfuse.stages import damage, shard
from mlpfuse.stages.damage import DamageConfig
from mlpfuse.stages.data import read_calib
from mlpfuse.stages.math.pruning import activation_scores, kept_neurons
from mlpfuse.stages.methods.base import BuildContext
from mlpfuse.stages.model.overlay import ff_patch
from mlpfuse.stages.model.runner import LayerStreamedModel
from mlpfuse.orchestrator.allocation import damage_at, free_allocation, stock_allocations
from mlpfuse.orchestrator.budget import ModelFacts
from tests.test_collect import _collect, _data


@pytest.fixture(scope="module")
def arts(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damage")
    sd = root / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, sd)
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    data = _data(root, n_blocks=16, block=16, vocab=vocab)
    coll = _collect(sd, data, root / "c", workers=1)
    out = root / "damage"
    damage.run(DamageConfig(tokens=64, steps=4, reference=0.5), {"shard": sd, "collect": coll, "data": data}, out)
    return {"shard": sd, "data": data, "collect": coll, "damage": out}


def _kl(model: LayerStreamedModel, ids: torch.Tensor, layer: int, state: dict | None) -> float:
    """KL(base ‖ variant) per token by full forwards: layer ``layer`` replaced by ``state`` (None:
    the layer dropped)."""
    from mlpfuse.stages.model.runner import SKIP

    base = torch.log_softmax(model.logits(ids).float(), -1)
    model.overrides[layer] = SKIP if state is None else state
    try:
        logq = torch.log_softmax(model.logits(ids).float(), -1)
    finally:
        del model.overrides[layer]
    return float((base.exp() * (base - logq)).sum()) / ids.numel()


def test_damage_matches_full_forwards_of_each_variant(arts: dict[str, Path]) -> None:
    """The stage's partial forwards from cached layer inputs give the same KL as running the whole
    model with the layer compressed (or dropped)."""
    res = damage.read_damage(arts["damage"])
    assert res["fractions"] == [0.25, 0.5, 0.75, 1.0] and res["tokens"] == 64
    ctx = BuildContext(arts["shard"], arts["collect"], arts["data"])
    ids = torch.from_numpy(read_calib(arts["data"])[:4])
    for row in res["layers"]:
        i = row["layer"]
        blocks = {}
        for ref in ctx.refs(i):
            ff = ctx.block(i, ref)
            kept = torch.sort(kept_neurons(activation_scores(ff, torch.from_numpy(ctx.energy(i, ref)).float()),
                                           ff.intermediate_size // 2)).values
            from mlpfuse.stages.math.refit import RefitAccumulator
            st = ctx.stats(i, "test")[ref.name]
            acc = RefitAccumulator.from_gram(torch.from_numpy(st["hidden.gram"]), torch.from_numpy(st["hidden.sum"]),
                                             int(st["count"][0]), kept, ff.down, ff.b_down, bias=ff.b_down is not None)
            w, b = acc.solve(1e-3)
            blocks[ref] = replace(ff.select(kept), down=w.float(), b_down=b).to(ctx.dtype)
        base = ctx.model.layer_state(i)
        patched = {**base, **ff_patch(ctx.family, ctx.config, base, blocks)}
        assert row["kl_reference"] == pytest.approx(_kl(ctx.model, ids, i, patched), rel=1e-3, abs=1e-7)
        assert row["kl_drop"] == pytest.approx(_kl(ctx.model, ids, i, None), rel=1e-3, abs=1e-7)


def test_damage_curves_fall_to_zero_at_full_width(arts: dict[str, Path]) -> None:
    for row in damage.read_damage(arts["damage"])["layers"]:
        d = row["damage"]
        assert d[-1] == 0.0 and all(x >= 0 for x in d)
        assert d[[0.25, 0.5, 0.75, 1.0].index(row["reference"])] == pytest.approx(row["kl_reference"])
        # Nested neuron sets: keeping more never leaves a larger block error (up to the ridge).
        assert all(a >= b - 1e-6 for a, b in itertools.pairwise(row["sse"]))
        assert row["kl_drop"] > 0


def _curves(n: int, steps: int, seed: int) -> dict:
    """Random damage curves: decreasing in the kept fraction, zero at full width."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        d = torch.sort(torch.rand(steps - 1, generator=g) * (1 + 3 * torch.rand(1, generator=g)), descending=True).values
        rows.append({"layer": i, "damage": [*d.tolist(), 0.0], "kl_drop": float(2 + 4 * torch.rand(1, generator=g))})
    return {"fractions": [j / steps for j in range(1, steps + 1)], "layers": rows}


def _facts(n: int, ff: int = 400, layer: int = 600) -> ModelFacts:
    return ModelFacts(num_layers=n, params=n * layer + 1000, ff_params=n * ff, layer_params=[layer] * n,
                      ff_layer_params=[ff] * n, cos=[0.5] * n)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drops", [False, True])
def test_free_allocation_is_the_exact_optimum_on_the_grid(seed: int, drops: bool) -> None:
    n, steps = 4, 4
    dmg, facts = _curves(n, steps, seed), _facts(n)
    remove = 700
    got = free_allocation(dmg, facts, remove, "params", drops)
    assert got is not None
    grid = dmg["fractions"]
    best = float("inf")
    opts = [*grid, "drop"] if drops else grid
    for combo in itertools.product(opts, repeat=n):
        if any(c == "drop" for i, c in enumerate(combo) if i in (0, n - 1)):
            continue
        removed = sum(600 if c == "drop" else 400 * (1 - c) for c in combo)
        if removed >= remove:
            best = min(best, sum(dmg["layers"][i]["kl_drop"] if c == "drop" else damage_at(dmg["layers"][i], grid, c)
                                 for i, c in enumerate(combo)))
    assert got.damage == pytest.approx(best)
    removed = sum(600 for _ in got.dropped) + sum(400 * (1 - f) for f in got.fractions.values())
    assert removed >= remove and (drops or not got.dropped)


def test_stock_allocation_drops_the_layers_cheapest_to_drop() -> None:
    n = 6
    dmg, facts = _curves(n, 8, seed=7), _facts(n)
    dmg["layers"][3]["kl_drop"] = 0.01  # nearly free to drop
    remove = 1200

    def keep_ratio(layers: list[int], freed: int = 0) -> float | None:
        r = 1 - (remove - freed) / (400 * len(layers))
        return min(r, 1.0) if r > 0 else None

    allocs = stock_allocations(dmg, facts, remove, "params", keep_ratio)
    assert allocs == sorted(allocs, key=lambda a: a.damage)
    one = next(a for a in allocs if len(a.dropped) == 1)
    assert one.dropped == (3,)
    assert len(set(one.fractions.values())) == 1  # one width for every remaining layer
    for a in allocs:
        assert all(0 < i < n - 1 for i in a.dropped)
        removed = 600 * len(a.dropped) + sum(400 * (1 - f) for f in a.fractions.values())
        assert removed >= remove - 1e-6


@pytest.mark.parametrize("export", ["stock", "tied"])
def test_planner_sends_damage_allocations_within_the_budget(export: str) -> None:
    from mlpfuse.orchestrator.budget import BudgetSpec, plan_candidates

    facts = ModelFacts(num_layers=6, params=1000, ff_params=600, layer_params=[150] * 6, ff_layer_params=[100] * 6,
                       cos=[0.1, 0.9, 0.5, 0.8, 0.7, 0.2], damage=_curves(6, 8, seed=3))
    facts.damage["layers"][2]["kl_drop"] = 0.001
    cands, _ = plan_candidates(BudgetSpec(target={"params": 0.8}, export=export, methods=["prune"]), facts)
    names = {c.name: c for c in cands}
    if export == "stock":
        combo = names["combo-damage-drop1-prune"]
        assert combo.config.drop == (2,) and 2 not in combo.config.candidate.layers
    else:
        alloc = names["prune-damage"].config.candidate
        assert alloc.layer_ratio and set(alloc.layer_ratio) == set(alloc.layers)
        removed = sum(100 * (1 - f) for f in alloc.layer_ratio.values())
        assert removed >= 200
        assert names["prune-damage-drop1"].config.drop == (2,)
