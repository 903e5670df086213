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


def obs_prune(down: Tensor, gram: Tensor, k: int, *, lam: float = 1e-3, steps: int = 64) -> tuple[Tensor, Tensor]:
    """Greedy structured OBS (SlimGPT, ZipLM): remove ``I - k`` neurons of a block whose down
    projection is ``down`` [out, I], each chosen by the output error that stays *after* the optimal
    update of the remaining down-projection columns, and apply those updates.

    ``gram`` = HᵀH [I, I] of the down projection's input on calibration tokens (collect's
    ``hidden.gram``). With ``Hinv = (G + λI)⁻¹`` (λ = ``lam`` · mean(diag G), as the refit's ridge),
    removing neuron j costs ``‖W[:, j]‖² / Hinv[j, j]`` and is compensated by
    ``W -= W[:, j] Hinv[j, :] / Hinv[j, j]``; ``Hinv`` then loses row and column j (a rank-1
    downdate). Neurons go in ``steps`` batches of the lowest costs, each batch removed jointly
    (its b×b block of ``Hinv`` inverted), so the cost is O(I²·(I−k)) whatever the batch size;
    ``steps = I − k`` is exact one-at-a-time greedy OBS. Returns (kept indices [k] ascending,
    the compensated down projection [out, k] float32). At ``k = I`` the block is unchanged.
    """
    w = down.detach().to(torch.float64).cpu().clone()
    n = w.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, I] = [1, {n}], got k={k}")
    g = torch.as_tensor(gram, dtype=torch.float64).cpu()
    if g.shape != (n, n):
        raise ValueError(f"gram must be [I, I] = [{n}, {n}], got {tuple(g.shape)}")
    if not torch.isfinite(g).all():
        raise ValueError("gram has NaN/inf entries")
    need = n - k
    if need == 0:
        return torch.arange(n), w.float()
    damp = lam * float(g.diagonal().mean()) or 1e-8
    a = g.clone()
    a.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(a)
    while int(info) != 0:  # not positive definite in float64 (tiny λ on a rank-deficient G)
        damp *= 10
        a.diagonal().add_(damp * 0.9)
        chol, info = torch.linalg.cholesky_ex(a)
    hinv = torch.cholesky_inverse(chol)
    del a, chol
    alive = torch.ones(n, dtype=torch.bool)
    per_step = max(1, -(-need // max(1, steps)))
    removed = 0
    while removed < need:
        idx = alive.nonzero().squeeze(1)
        d = hinv.diagonal()[idx].clamp_min(1e-300)
        cost = w[:, idx].square().sum(0) / d
        b = min(per_step, need - removed)
        # Lowest cost first; ties to the lower index, so the result is deterministic.
        batch = idx[torch.argsort(cost, stable=True)[:b]]
        m_inv = torch.linalg.pinv(hinv[batch][:, batch], hermitian=True)
        rows = hinv[batch]  # [b, I]
        w -= (w[:, batch] @ m_inv) @ rows
        hinv -= rows.T @ m_inv @ rows
        w[:, batch] = 0.0
        alive[batch] = False
        removed += b
    kept = alive.nonzero().squeeze(1)
    return kept, w[:, kept].float()


def gram_sse(down: Tensor, gram: Tensor, kept: Tensor, new_down: Tensor) -> float:
    """``‖H W'ᵀ_kept − H Wᵀ‖²`` summed over the calibration tokens of ``gram`` = HᵀH: the output
    error of a block that keeps neurons ``kept`` with down projection ``new_down`` [out, k],
    against the original ``down`` [out, I], from the statistics alone (no bias)."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    full = torch.zeros_like(down, dtype=torch.float64)
    full[:, torch.as_tensor(kept, dtype=torch.long)] = new_down.to(torch.float64)
    diff = full - down.to(torch.float64)
    return float((diff @ g * diff).sum())
