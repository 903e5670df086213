"""MLP Fusion (``method: fusion``): each FF block's sub-MLPs clustered by k-means into k, the
per-cluster counts P kept (the NTK-preserving training form) and folded into the down projection
for export; per expert for MoE, router untouched. ``mode: cluster`` is the paper's plain
clustering baseline; ``weighting`` weights neurons by their activation energy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.fusion import fuse_ff
from mlpfuse.stages.methods.base import BuildContext, SizedMethodConfig
from mlpfuse.stages.model.families import FFBlockRef


class FusionMethod(SizedMethodConfig):
    method: Literal["fusion"] = "fusion"
    mode: Literal["fusion", "cluster"] = "fusion"
    weighting: Literal["none", "energy", "sqrt_energy"] = "none"
    iters: int = Field(30, ge=1)
    seed: int = 0


def fuse_block(m: FusionMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights,
               size: int | None = None) -> FFWeights:
    """MLP Fusion of one block: k-means of its sub-MLPs; the training form's counts P are kept
    beside the folded export form."""
    k = m.k(ff.intermediate_size)
    energy = None
    if m.weighting != "none":
        energy = ctx.energy(i, ref) * (ff.down.double() ** 2).sum(0).numpy()
    fused = fuse_ff(
        ff, k, iters=m.iters, seed=m.seed, mode=m.mode,
        weights=energy if m.weighting == "energy" else None,
        scale_by_sqrt_energy=energy if m.weighting == "sqrt_energy" else None,
    )
    if m.mode == "fusion":
        ctx.counts[f"L{i:05d}/{ref.name}"] = fused.scale.float().contiguous()
    return fused.fold()
