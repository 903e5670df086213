"""Structured neuron pruning (``method: prune``): each block keeps its best-scored neurons, by
activation energy E[h²]·‖W_out[:, i]‖² from collect's statistics, by weight magnitude, or at random;
``allocation: sensitivity`` spreads the same total over blocks by one global ranking."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math import pruning
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.methods.base import BuildContext, SizedMethodConfig, method_layers
from mlpfuse.stages.model.families import FFBlockRef


class PruneMethod(SizedMethodConfig):
    method: Literal["prune"] = "prune"
    criterion: Literal["activation", "magnitude", "random"] = "activation"
    seed: int = 0
    # uniform: every block keeps the same fraction. sensitivity: the same total is kept, spread
    # over the layers by one global ranking of each neuron's share of its block's score, so blocks
    # whose output rests on few neurons lose more and blocks that need many keep them (per-layer
    # sizes: saves loaded parameters in the tied export).
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    # sensitivity: no block keeps fewer than this fraction of its neurons.
    min_ratio: float = Field(0.125, gt=0, le=1)


def prune_scores(m: PruneMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights) -> Tensor:
    if m.criterion == "activation":
        return pruning.activation_scores(ff, torch.from_numpy(ctx.energy(i, ref)).float())
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
    k = size if size is not None else m.k(ff.intermediate_size)
    kept = pruning.kept_neurons(prune_scores(m, ctx, i, ref, ff), k)
    ctx.kept[f"L{i:05d}/{ref.name}"] = kept
    return ff.select(kept)


def prune_sizes(m: PruneMethod, ctx: BuildContext) -> dict[tuple[int, FFBlockRef], int]:
    """Per-block sizes decided before any block is built (the sensitivity allocation), else none."""
    return sensitivity_sizes(m, ctx) if m.allocation == "sensitivity" else {}
