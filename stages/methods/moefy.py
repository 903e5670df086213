"""MLPMoE (``method: moefy``): each FF block sliced into a static mixture of branches (their sum
is the dense block), then Compensated Pruning of whole branches or Fractal Fade of neurons within
them; written in its dense form, the branch map kept for inspection."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.moefy import (
    StaticMoE,
    branch_map,
    compensated_prune,
    fractal_fade,
    to_dense,
)
from mlpfuse.stages.methods.base import BuildContext, MethodConfig
from mlpfuse.stages.model.families import FFBlockRef


class MoefyMethod(MethodConfig):
    method: Literal["moefy"] = "moefy"
    branches: int = Field(8, ge=2)
    # contiguous: index slices (the paper). importance: bands of the data-free score
    # ||W_in row|| * ||W_out col||. activation: bands of the activation-aware score
    # E[h_i^2] * ||W_out col||^2 from collect's statistics (also used for the compensation gains).
    assignment: Literal["contiguous", "importance", "activation"] = "contiguous"
    op: Literal["compensated", "fade", "none"] = "compensated"
    # compensated: fraction of branches kept; fade: fraction of neurons removed.
    keep_branches: float = Field(0.75, gt=0, le=1)
    sparsity: float = Field(0.25, ge=0, lt=1)
    compensate: bool = True
    schedule: Literal["uniform", "linear", "geometric"] = "linear"


def moefy_block(m: MoefyMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights,
                size: int | None = None) -> FFWeights:
    """MLPMoE of one block: sliced into a static MoE, then Compensated Pruning or Fractal Fade;
    written in its dense form (surviving neurons unchanged and in order, α folded in)."""
    hsm = torch.from_numpy(ctx.energy(i, ref)).double() if m.assignment == "activation" else None
    method = "importance" if m.assignment == "activation" else m.assignment
    moe = StaticMoE.from_dense(ff, m.branches, method, hidden_second_moment=hsm)
    if m.op == "compensated":
        moe = compensated_prune(moe, m.keep_branches, compensate=m.compensate, hidden_second_moment=hsm)
    elif m.op == "fade":
        moe = fractal_fade(moe, m.sparsity, m.schedule, hidden_second_moment=hsm)
    branch, alpha = branch_map(moe)
    ctx.branches[f"L{i:05d}/{ref.name}/branch"], ctx.branches[f"L{i:05d}/{ref.name}/alpha"] = branch, alpha
    ctx.kept[f"L{i:05d}/{ref.name}"] = torch.nonzero(branch >= 0).reshape(-1).long()
    return to_dense(moe)


def moefy_width(m: MoefyMethod, n: int, layer: int | None = None) -> int | None:
    """Neurons an MLPMoE block of width ``n`` keeps: Fractal Fade removes exactly ``ceil(s·n)``;
    Compensated Pruning keeps whole branches, of equal width when ``branches`` divides ``n``."""
    if m.op == "none":
        return n
    if m.op == "fade":
        return n - math.ceil(m.sparsity * n - 1e-9)
    if n % m.branches:
        return None
    return max(1, round(m.keep_branches * m.branches)) * (n // m.branches)
