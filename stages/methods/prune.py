"""Structured neuron pruning (``method: prune``): each block keeps its best-scored neurons, by
activation energy E[h²]·‖W_out[:, i]‖² from collect's statistics, by weight magnitude, or at random;
or, with ``criterion: obs``, removes neurons greedily by the error left after the optimal update
of the remaining down-projection columns (structured OBS from collect's HᵀH) and applies those
updates. ``allocation: sensitivity`` spreads the same total over blocks by one global ranking."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math import pruning
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.methods.base import BuildContext, SizedMethodConfig, method_layers
from mlpfuse.stages.model.families import FFBlockRef


class PruneMethod(SizedMethodConfig):
    method: Literal["prune"] = "prune"
    criterion: Literal["activation", "magnitude", "random", "obs"] = "activation"
    seed: int = 0
    # obs: neurons are removed in this many batches (each batch jointly, with its compensation);
    # the number of neurons removed is exact one-at-a-time greedy OBS.
    obs_steps: int = Field(64, ge=1)
    # obs: the ridge on HᵀH, relative to its mean diagonal (as the refit's lam).
    obs_lam: float = Field(1e-3, ge=0)
    # uniform: every block keeps the same fraction. sensitivity: the same total is kept, spread
    # over the layers by one global ranking of each neuron's share of its block's score, so blocks
    # whose output rests on few neurons lose more and blocks that need many keep them (per-layer
    # sizes: saves loaded parameters in the tied export).
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    # sensitivity: no block keeps fewer than this fraction of its neurons.
    min_ratio: float = Field(0.125, gt=0, le=1)
    # Per-layer kept fractions (the planner's damage allocation); a layer not listed keeps
    # ``ratio``. Rounded to ``multiple_of`` as ``ratio`` is.
    layer_ratio: dict[int, float] | None = None

    @model_validator(mode="after")
    def _layer_ratios(self) -> PruneMethod:
        if self.layer_ratio is not None:
            if self.allocation != "uniform" or self.keep is not None:
                raise ValueError("layer_ratio gives each layer's fraction itself (allocation: uniform, ratio, no keep)")
            bad = {i: r for i, r in self.layer_ratio.items() if not 0 < r <= 1}
            if bad:
                raise ValueError(f"layer_ratio: fractions must be in (0, 1], got {bad}")
        return self

    def k(self, size: int, layer: int | None = None) -> int:
        if layer is not None and self.layer_ratio and layer in self.layer_ratio:
            return super().model_copy(update={"ratio": self.layer_ratio[layer], "layer_ratio": None}).k(size)
        return super().k(size)

    @model_validator(mode="after")
    def _obs_uniform(self) -> PruneMethod:
        if self.criterion == "obs" and self.allocation != "uniform":
            raise ValueError("criterion obs chooses neurons within a block (allocation: uniform)")
        return self


def prune_scores(m: PruneMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights) -> Tensor:
    if m.criterion == "activation":
        return pruning.activation_scores(ff, torch.from_numpy(ctx.energy(i, ref)).float())
    if m.criterion == "obs":
        raise InputError("criterion obs has no per-neuron score to rank (allocation: uniform)")
    if m.criterion == "magnitude":
        return pruning.magnitude_scores(ff)
    return pruning.random_scores(ff, seed=m.seed + 7919 * i)


def sensitivity_sizes(m: PruneMethod, ctx: BuildContext) -> dict[tuple[int, FFBlockRef], int]:
    """Neurons kept per block when ``m``'s total is spread by one global ranking: each neuron's
    score as a share of its block's total, so a neuron is cut where it matters least to its own
    block's output; every block keeps at least ``min_ratio``, the total kept equals uniform's."""
    shares, floors, total = [], {}, 0
    for i in method_layers(m, ctx.num_layers):
        for ref in ctx.refs(i):
            ff = ctx.block(i, ref)
            sc = prune_scores(m, ctx, i, ref, ff).double()
            n = ff.intermediate_size
            total += m.k(n)
            floors[(i, ref)] = max(1, math.ceil(m.min_ratio * n))
            order = torch.sort(sc, descending=True).values / max(float(sc.sum()), 1e-30)
            shares += [(float(v), j, (i, ref)) for j, v in enumerate(order.tolist()) if j >= floors[(i, ref)]]
    sizes = dict(floors)
    spare = total - sum(floors.values())
    if spare < 0:
        raise InputError(f"min_ratio={m.min_ratio} keeps more neurons than the budget allows")
    # Within a block, shares are in descending order, so taking the largest shares globally keeps
    # each block's top neurons: the count per block is all that matters.
    for _, _, key in sorted(shares, key=lambda t: (-t[0], t[1]))[:spare]:
        sizes[key] += 1
    return sizes


def prune_block(m: PruneMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights,
                size: int | None = None) -> FFWeights:
    """Keep the ``size`` (or ``m.k``) best-scored neurons; their indices are recorded for the refit."""
    k = size if size is not None else m.k(ff.intermediate_size, i)
    if m.criterion == "obs":
        kept, down = pruning.obs_prune(ff.down, block_gram(ctx, i, ref, ff), k, lam=m.obs_lam, steps=m.obs_steps)
        ctx.kept[f"L{i:05d}/{ref.name}"] = kept
        return replace(ff.select(kept), down=down.to(ff.down.dtype))
    kept = pruning.kept_neurons(prune_scores(m, ctx, i, ref, ff), k)
    ctx.kept[f"L{i:05d}/{ref.name}"] = kept
    return ff.select(kept)


def block_gram(ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights) -> Tensor:
    """collect's HᵀH [I, I] of one block (float64), or an error saying how to get it."""
    st = ctx.stats(i, "OBS pruning").get(ref.name, {})
    if "hidden.gram" not in st or not int(st["count"][0]):
        raise InputError(f"criterion obs needs collect's HᵀH of layer {i} {ref.name} ({ff.intermediate_size} "
                         "neurons): collect with gram_max at least the FF width")
    return torch.from_numpy(st["hidden.gram"])


def prune_sizes(m: PruneMethod, ctx: BuildContext) -> dict[tuple[int, FFBlockRef], int]:
    """Per-block sizes decided before any block is built (the sensitivity allocation), else none."""
    return sensitivity_sizes(m, ctx) if m.allocation == "sensitivity" else {}
