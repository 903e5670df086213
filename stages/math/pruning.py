"""Neuron-pruning baselines: keep the k highest-scoring intermediate neurons of an FF block.

At equal k a pruned block has exactly the parameter count of a block fused to k centroids (after
folding), so the two compare at the same budget. Scores are [I] tensors, higher = keep.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlpfuse.stages.math.ffweights import FFWeights


def _in_rows(ff: FFWeights) -> Tensor:
    """Each neuron's input weights [I, H] or [I, 2H] (GLU: gate and up rows side by side)."""
    return ff.up if ff.gate is None else torch.cat([ff.gate, ff.up], dim=1)


def magnitude_scores(ff: FFWeights) -> Tensor:
    """``||W_in[i]|| * ||W_out[:, i]||`` [I] float32; for GLU W_in[i] is cat(gate[i], up[i])."""
    return (_in_rows(ff).float().norm(dim=1) * ff.down.float().norm(dim=0)).cpu()


def random_scores(ff: FFWeights, seed: int) -> Tensor:
    """Uniform random scores [I] float32 from ``seed`` (the same seed keeps the same neurons)."""
    return torch.rand(ff.intermediate_size, generator=torch.Generator().manual_seed(seed))


def activation_scores(ff: FFWeights, h_sq_mean: Tensor) -> Tensor:
    """``E[h_i^2] * ||W_out[:, i]||^2`` [I] float32: the expected squared contribution of neuron i
    to the output if the other neurons' contributions were orthogonal to it. ``h_sq_mean`` [I] is
    the mean square of the down projection's input (``ff.hidden(x)``) over calibration tokens."""
    h = torch.as_tensor(h_sq_mean).float().cpu()
    if h.shape != (ff.intermediate_size,):
        raise ValueError(
            f"h_sq_mean must have shape [I] = [{ff.intermediate_size}], got {tuple(h.shape)}"
        )
    return h * ff.down.float().square().sum(dim=0).cpu()


def prune_ff(ff: FFWeights, k: int, scores: Tensor) -> FFWeights:
    """Keep the ``k`` neurons with the highest ``scores`` [I], in their original order (ties go to
    the lower index, so the result is deterministic)."""
    n = ff.intermediate_size
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, I] = [1, {n}] for a block with {n} neurons, got k={k}")
    s = torch.as_tensor(scores).cpu()
    if s.shape != (n,):
        raise ValueError(f"scores must have shape [I] = [{n}], got {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite (NaN/inf would make the kept set arbitrary)")
    return ff.select(kept_neurons(s, k).to(ff.up.device))


def kept_neurons(scores: Tensor, k: int) -> Tensor:
    """The indices [k] (ascending) :func:`prune_ff` keeps for ``scores``."""
    return torch.argsort(torch.as_tensor(scores).cpu(), descending=True, stable=True)[:k].sort().values
