"""MLPMoE math: slice a dense MLP into a static mixture of experts, then fade and prune branches.

The author's code (MLPMoE, Novikov 2025) was not obtainable, so every operation is defined here;
the stage and the report cite these definitions. Notation for one FF block (:class:`FFWeights`):
input ``x`` [H]; intermediate neuron ``i`` has input row(s) ``u_i`` (up), ``g_i`` (gate, GLU only),
bias ``b_i`` (optional) and output column ``d_i`` = ``down[:, i]``; its hidden value is
``h_i = act(g_i·x) (u_i·x + b_i)`` (GLU) or ``h_i = act(u_i·x + b_i)``; the block outputs
``y = Σ_i d_i h_i + b_down``.

**Slicing (the zero-shot transform).** A partition of the neurons into B branches
``S_1 … S_B`` (:func:`branch_assignment`) gives ``y = Σ_b y_b + b_down`` with
``y_b = Σ_{i∈S_b} d_i h_i`` — exactly the dense output, because the sum over neurons is only
regrouped (the same algebra as tensor-parallel MLP sharding). :class:`StaticMoE` computes
``y = Σ_b α_b y_b + b_down`` with per-branch scalar gains ``α_b`` (1 at construction). Every
branch is always active: there is no router. ``b_down`` is added once, outside the branch sum,
otherwise it would be counted B times.

**Neuron energy (data-free proxy).** ``E‖d_i h_i‖² = ‖d_i‖² E[h_i²]``. Without data we take the
block input to be isotropic with unit variance per coordinate (what the pre-FF RMSNorm/LayerNorm
roughly produces) and the bias as the weight of a constant input 1. Then the pre-activation
``u_i·x + b_i`` has second moment ``‖u_i‖² + b_i²``; for ReLU-like activations
(ReLU/GELU/SiLU away from 0) ``E[act(z)²] ∝ E[z²]``; for GLU the gate and up paths are treated
as independent, so ``E[h_i²] ∝ ‖g_i‖² (‖u_i‖² + b_i²)``. Hence the per-neuron energy

    e_i = ‖d_i‖² · ‖[u_i, b_i]‖²            (non-GLU)
    e_i = ‖d_i‖² · ‖g_i‖² · ‖[u_i, b_i]‖²   (GLU)

and the neuron *importance* score ``sqrt(e_i)`` = ‖W_in row‖·‖W_out column‖ (for GLU, "W_in row"
is ‖g_i‖·‖[u_i, b_i]‖: a product, not the norm of the concatenation, so a large gate cannot hide
a dead up row; the neuron's output is bilinear in the two). With calibration statistics
(``hidden_second_moment``: ``E[h_i²]`` [I] from ``collect``), ``e_i = ‖d_i‖² E[h_i²]`` replaces the
proxy. Given the full second moment matrix ``Σ = E[h hᵀ]`` [I, I], a branch's energy is exact:
``E_b = E‖y_b‖² = Σ_{i,j∈S_b} Σ_ij d_i·d_j``.

**Branch energy.** With neurons treated as uncorrelated, ``E_b = Σ_{i∈S_b} e_i``; branches are
ranked by their current contribution ``α_b² E_b`` (rank 0 = most important).

**Fractal Fade (differential branch sparsity, :func:`fractal_fade`).** For an overall sparsity
``s`` (fraction of the MoE's neurons, hence of its MLP parameters, to remove), branch of rank
``r`` (of B) gets sparsity ``s_r = min(cap, λ p_r)`` where the profile ``p_r`` is

    uniform:    p_r = 1
    linear:     p_r = 1 + (ratio − 1) · r / (B − 1)
    geometric:  p_r = ratio ** (r / (B − 1))

(``ratio`` = sparsity of the least over the most important branch before capping, default 4) and
``λ`` is solved (bisection) so that the size-weighted mean ``Σ_r n_r s_r / Σ_r n_r = s``: the cap
(``max_branch_sparsity``) water-fills the excess onto the other branches. Counts are rounded by
largest remainder so exactly ``ceil(s · N)`` neurons go (never fewer than asked, so a size budget
holds). Within each branch the lowest-energy neurons are removed (structured: whole neurons, so
the result is a smaller dense MLP). Rationale: important branches keep nearly all neurons,
unimportant ones absorb most of the pruning — a smooth version of "drop the weakest branches".

**Compensated Pruning (:func:`compensated_prune`).** Remove whole branches, keeping the ``k``
with the largest ``α_b² E_b``. With branch outputs treated as uncorrelated (zero cross terms),

    E‖Σ_b α_b y_b‖² ≈ Σ_b α_b² E_b,

so rescaling every survivor by the same ``c = sqrt(Σ_all α_b² E_b / Σ_kept α_b² E_b)`` restores the
proxy energy of the full output (the "variance-preserving" reduction). ``compensate=False`` prunes
without rescaling. ``b_down`` is not pruned and not part of the energy. Caveat, by the same
assumption: the survivors' outputs are uncorrelated with what was removed, so the MSE-optimal gain
is 1 (no rescaling); compensation trades extra error for keeping the output's scale (what the
residual stream and the next norm see). The two are measured against each other downstream.

**Export (:func:`to_dense`).** Surviving neurons are concatenated (in original order), ``α_b``
folded into their ``down`` columns: a plain, smaller MLP that vanilla transformers loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeAlias, cast

import numpy as np
import torch
from torch import Tensor, nn

from mlpfuse.stages.math.ffweights import FFWeights

BranchMethod: TypeAlias = Literal["contiguous", "importance"]
FadeSchedule: TypeAlias = Literal["uniform", "linear", "geometric"]


# --------------------------------------------------------------------------------------------
# Neuron and branch scores
# --------------------------------------------------------------------------------------------


def _in_energy(ff: FFWeights) -> Tensor:
    """``‖[u_i, b_i]‖²`` (times ``‖g_i‖²`` for GLU) [I], float64."""
    up_sq = ff.up.detach().double().square().sum(1)
    if ff.b_up is not None:
        up_sq = up_sq + ff.b_up.detach().double().square()
    if ff.gate is not None:
        up_sq = up_sq * ff.gate.detach().double().square().sum(1)
    return up_sq


def _check_moments(moment: Tensor, n: int) -> Tensor:
    m = torch.as_tensor(moment).detach().double().cpu()
    if m.shape not in ((n,), (n, n)):
        raise ValueError(
            f"hidden_second_moment must be E[h_i^2] [{n}] or E[h h^T] [{n}, {n}] "
            "for the dense MLP's "
            f"{n} neurons, got shape {tuple(m.shape)}"
        )
    diag = m if m.ndim == 1 else m.diagonal()
    if not torch.isfinite(m).all() or (diag < 0).any():
        raise ValueError("hidden_second_moment must be finite with a non-negative diagonal")
    return m


def neuron_energy(ff: FFWeights, hidden_second_moment: Tensor | None = None) -> Tensor:
    """Per-neuron output energy ``e_i`` [I] (float64): the data-free proxy of the module docstring,
    or ``‖d_i‖² E[h_i²]`` when ``hidden_second_moment`` ([I], or [I, I] whose diagonal is used) is
    given. ``sqrt(e_i)`` is the importance score."""
    d_sq = ff.down.detach().double().square().sum(0).cpu()
    if hidden_second_moment is None:
        return d_sq * _in_energy(ff).cpu()
    m = _check_moments(hidden_second_moment, ff.intermediate_size)
    return d_sq * (m if m.ndim == 1 else m.diagonal())


def neuron_importance(ff: FFWeights, hidden_second_moment: Tensor | None = None) -> Tensor:
    """``‖W_in row i‖ · ‖W_out column i‖`` [I] (float64), see :func:`neuron_energy`."""
    return neuron_energy(ff, hidden_second_moment).sqrt()


def branch_assignment(
    ff: FFWeights,
    num_branches: int,
    method: BranchMethod = "contiguous",
    *,
    hidden_second_moment: Tensor | None = None,
) -> list[Tensor]:
    """Partition the ``I`` intermediate neurons into ``num_branches`` branches.

    "contiguous": neurons ``[0, I/B)``, ``[I/B, 2I/B)``, … as in the paper (tensor-parallel
    slices). "importance": neurons sorted by :func:`neuron_importance` (descending, ties by index)
    and cut into consecutive bands, so branch 0 holds the most important ``I/B`` neurons and the
    last branch the least important — pruning whole trailing branches removes the least important
    neurons. Sizes differ by at most one (the first ``I mod B`` branches get the extra neuron).

    Returns:
        ``num_branches`` int64 index tensors (each sorted ascending) that together hold every
        neuron exactly once.
    """
    n = ff.intermediate_size
    if (
        isinstance(num_branches, bool)
        or not isinstance(num_branches, int)
        or not 1 <= num_branches <= n
    ):
        raise ValueError(
            f"num_branches must be an integer in [1, {n}] (the intermediate size), "
            f"got {num_branches!r}"
        )
    if method == "contiguous":
        order = torch.arange(n)
    elif method == "importance":
        score = neuron_importance(ff, hidden_second_moment)
        order = torch.sort(score, descending=True, stable=True).indices
    else:
        raise ValueError(f"unknown branch method {method!r}; expected 'contiguous' or 'importance'")
    return [chunk.sort().values for chunk in torch.tensor_split(order, num_branches)]


# --------------------------------------------------------------------------------------------
# The static MoE module
# --------------------------------------------------------------------------------------------


class _Branch(nn.Module):
    """One static expert: a slice of the dense MLP's neurons, without ``b_down``."""

    def __init__(self, ff: FFWeights, index: Tensor) -> None:
        super().__init__()
        self.act = ff.act
        self.up = nn.Parameter(ff.up.detach().clone())
        self.down = nn.Parameter(ff.down.detach().clone())
        self.gate = None if ff.gate is None else nn.Parameter(ff.gate.detach().clone())
        self.b_up = None if ff.b_up is None else nn.Parameter(ff.b_up.detach().clone())
        self.register_buffer("index", index.detach().to(torch.long).cpu().clone())

    def ff(self) -> FFWeights:
        return FFWeights(up=self.up, down=self.down, act=self.act, gate=self.gate, b_up=self.b_up)


class StaticMoE(nn.Module):
    """A dense MLP regrouped into always-active branches with scalar gains.

    ``forward(x) = Σ_b α_b · down_b @ h_b(x) + b_down`` for ``x`` [..., H] -> [..., H]; with every
    ``α_b = 1`` and all neurons present it equals the dense MLP (up to summation order).

    Args:
        branches: each an :class:`FFWeights` slice ([I_b, H] up/gate, [H, I_b] down) with
            ``b_down=None`` (the shared output bias goes in ``b_down``, added once).
        indices: per branch, the dense MLP's neuron ids of its neurons [I_b] (export order and
            calibration statistics are keyed by them).
        b_down: the dense MLP's output bias [H] or None.
        source_size: the dense MLP's intermediate size I.
        alpha: [B] initial gains; ones when omitted.
    """

    def __init__(
        self,
        branches: Sequence[FFWeights],
        indices: Sequence[Tensor],
        b_down: Tensor | None,
        source_size: int,
        alpha: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not branches:
            raise ValueError("a StaticMoE needs at least one branch")
        if len(indices) != len(branches):
            raise ValueError(f"got {len(indices)} index tensors for {len(branches)} branches")
        ref = branches[0]
        seen: set[int] = set()
        for b, (ff, idx) in enumerate(zip(branches, indices)):
            if ff.b_down is not None:
                raise ValueError(
                    f"branch {b} carries b_down; pass the output bias once as StaticMoE(b_down=...)"
                )
            if (
                ff.act != ref.act
                or ff.is_glu != ref.is_glu
                or (ff.b_up is None) != (ref.b_up is None)
            ):
                raise ValueError(
                    f"branch {b} differs from branch 0 in activation, GLU-ness or up bias"
                )
            if ff.hidden_size != ref.hidden_size or ff.down.shape[0] != ref.down.shape[0]:
                raise ValueError(
                    f"branch {b} has hidden size {ff.hidden_size}, branch 0 {ref.hidden_size}"
                )
            ids = [int(i) for i in idx.reshape(-1)]
            if len(ids) != ff.intermediate_size:
                raise ValueError(
                    f"branch {b} has {ff.intermediate_size} neurons but {len(ids)} indices"
                )
            if (
                any(i < 0 or i >= source_size for i in ids)
                or seen.intersection(ids)
                or len(set(ids)) != len(ids)
            ):
                raise ValueError(
                    f"branch {b}'s indices repeat a neuron or fall outside range({source_size})"
                )
            seen.update(ids)
        self.source_size = int(source_size)
        self.branches = nn.ModuleList(_Branch(ff, idx) for ff, idx in zip(branches, indices))
        self.b_down = None if b_down is None else nn.Parameter(b_down.detach().clone())
        a = (
            torch.ones(len(branches))
            if alpha is None
            else torch.as_tensor(alpha, dtype=torch.float32).clone()
        )
        if a.shape != (len(branches),) or not torch.isfinite(a).all():
            raise ValueError(
                f"alpha must be {len(branches)} finite gains, got shape {tuple(a.shape)}"
            )
        self.alpha = nn.Parameter(a)

    @classmethod
    def from_dense(
        cls,
        ff: FFWeights,
        num_branches: int,
        method: BranchMethod = "contiguous",
        *,
        hidden_second_moment: Tensor | None = None,
    ) -> StaticMoE:
        """Slice ``ff`` into ``num_branches`` branches (see :func:`branch_assignment`), α = 1."""
        idx = branch_assignment(ff, num_branches, method, hidden_second_moment=hidden_second_moment)
        branches = [_strip_b_down(ff.select(i.to(ff.up.device))) for i in idx]
        return cls(branches, idx, ff.b_down, ff.intermediate_size)

    def _branch(self, b: int) -> _Branch:
        return cast(_Branch, self.branches[b])

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def branch_sizes(self) -> list[int]:
        return [int(self._branch(b).up.shape[0]) for b in range(self.num_branches)]

    @property
    def intermediate_size(self) -> int:
        """Neurons present now (sum of branch sizes)."""
        return sum(self.branch_sizes)

    @property
    def act(self) -> str:
        return self._branch(0).act

    def branch_ff(self, b: int) -> FFWeights:
        """Branch ``b`` as detached :class:`FFWeights` (no ``b_down``, no ``α``)."""
        ff = self._branch(b).ff()
        return FFWeights(
            up=ff.up.detach(),
            down=ff.down.detach(),
            act=ff.act,
            gate=None if ff.gate is None else ff.gate.detach(),
            b_up=None if ff.b_up is None else ff.b_up.detach(),
        )

    def branch_index(self, b: int) -> Tensor:
        """Dense-MLP neuron ids of branch ``b`` [I_b] (int64)."""
        return cast(Tensor, self._branch(b).index)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor | None = None
        for b in range(self.num_branches):
            ff = self._branch(b).ff()
            yb = torch.nn.functional.linear(ff.hidden(x), ff.down) * self.alpha[b].to(x.dtype)
            y = yb if y is None else y + yb
        assert y is not None  # the constructor guarantees a branch
        return y if self.b_down is None else y + self.b_down

    def extra_repr(self) -> str:
        return (
            f"branches={self.num_branches}, sizes={self.branch_sizes}, act={self.act!r}, "
            f"source_size={self.source_size}"
        )


def _strip_b_down(ff: FFWeights) -> FFWeights:
    return FFWeights(up=ff.up, down=ff.down, act=ff.act, gate=ff.gate, b_up=ff.b_up)


def _rebuild(moe: StaticMoE, keep: list[tuple[int, Tensor]], alpha: Tensor) -> StaticMoE:
    """A new StaticMoE with branch ``b`` reduced to its local neuron positions ``pos`` for each
    ``(b, pos)`` in ``keep`` (branches not listed, or left empty, are dropped)."""
    branches, indices, gains = [], [], []
    for (b, pos), a in zip(keep, alpha.tolist()):
        if pos.numel() == 0:
            continue
        ff = moe.branch_ff(b)
        branches.append(ff.select(pos.to(ff.up.device)))
        indices.append(moe.branch_index(b)[pos.cpu()])
        gains.append(a)
    if not branches:
        raise ValueError("the pruning would remove every neuron; keep at least one")
    b_down = None if moe.b_down is None else moe.b_down.detach()
    return StaticMoE(
        branches, indices, b_down, moe.source_size, torch.tensor(gains, dtype=torch.float32)
    )


# --------------------------------------------------------------------------------------------
# Energy, fade, prune, export
# --------------------------------------------------------------------------------------------


def _branch_neuron_energy(moe: StaticMoE, b: int, hidden_second_moment: Tensor | None) -> Tensor:
    ff = moe.branch_ff(b)
    if hidden_second_moment is None:
        return neuron_energy(ff)
    m = _check_moments(hidden_second_moment, moe.source_size)
    idx = moe.branch_index(b)
    diag = m if m.ndim == 1 else m.diagonal()
    return ff.down.double().square().sum(0).cpu() * diag[idx]


def branch_energy(moe: StaticMoE, hidden_second_moment: Tensor | None = None) -> Tensor:
    """``E_b`` [B] (float64, without α): the branch's output energy ``E‖y_b‖²``.

    Data-free: ``Σ_{i∈S_b} e_i`` (neurons uncorrelated). With ``hidden_second_moment`` [I]:
    ``Σ_{i∈S_b} ‖d_i‖² E[h_i²]``; with [I, I]: exact, ``Σ_{i,j∈S_b} Σ_ij d_i·d_j``
    (``Σ`` indexed by the dense MLP's neuron ids).
    """
    out = torch.empty(moe.num_branches, dtype=torch.float64)
    full = None
    if hidden_second_moment is not None:
        full = _check_moments(hidden_second_moment, moe.source_size)
        if full.ndim == 1:
            full = None
    for b in range(moe.num_branches):
        if full is None:
            out[b] = _branch_neuron_energy(moe, b, hidden_second_moment).sum()
        else:
            d = moe.branch_ff(b).down.double().cpu()
            idx = moe.branch_index(b)
            out[b] = ((d.T @ d) * full[idx][:, idx]).sum()
    return out


def output_energy_proxy(moe: StaticMoE, hidden_second_moment: Tensor | None = None) -> float:
    """``Σ_b α_b² E_b``: the output energy ``E‖Σ_b α_b y_b‖²`` with branches uncorrelated (the
    quantity :func:`compensated_prune` preserves)."""
    a = moe.alpha.detach().double()
    return float((a.square() * branch_energy(moe, hidden_second_moment)).sum())


def _branch_ranks(moe: StaticMoE, hidden_second_moment: Tensor | None) -> Tensor:
    """Branch ids ordered from most to least important by ``α_b² E_b`` (ties: lower id first)."""
    contrib = moe.alpha.detach().double().square() * branch_energy(moe, hidden_second_moment)
    return torch.sort(contrib, descending=True, stable=True).indices


def fade_schedule(
    sizes: Sequence[int],
    sparsity: float,
    schedule: FadeSchedule = "linear",
    *,
    ratio: float = 4.0,
    max_branch_sparsity: float = 1.0,
) -> list[int]:
    """Neurons to remove per branch, branches given from most to least important.

    Implements the Fractal Fade schedule of the module docstring: ``s_r = min(cap, λ p_r)`` with
    ``Σ_r n_r s_r = s · N``, rounded by largest remainder so exactly ``ceil(s · N)`` neurons go.

    Args:
        sizes: ``n_r`` neurons of the rank-r branch.
        sparsity: overall fraction ``s`` in [0, 1) of the neurons to remove.
        schedule: "uniform", "linear" or "geometric" profile ``p_r``.
        ratio: ``p_{B-1} / p_0`` (>= 1) for linear/geometric.
        max_branch_sparsity: the cap, in (0, 1]; 1 lets the weakest branches vanish entirely.
    """
    n = np.asarray(sizes, dtype=np.float64)
    total = float(n.sum())
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < max_branch_sparsity <= 1.0:
        raise ValueError(f"max_branch_sparsity must be in (0, 1], got {max_branch_sparsity}")
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio}")
    if len(n) == 0 or (n < 0).any():
        raise ValueError(
            f"sizes must be a non-empty list of non-negative counts, got {list(sizes)}"
        )
    b = len(n)
    t = np.arange(b) / max(b - 1, 1)
    if schedule == "uniform":
        p = np.ones(b)
    elif schedule == "linear":
        p = 1.0 + (ratio - 1.0) * t
    elif schedule == "geometric":
        p = ratio**t
    else:
        raise ValueError(
            f"unknown fade schedule {schedule!r}; expected 'uniform', 'linear' or 'geometric'"
        )
    limit = np.floor(max_branch_sparsity * n + 1e-9).astype(np.int64)
    target = math.ceil(sparsity * total - 1e-9)  # at least the fraction asked: a size budget is never exceeded
    if target > int(limit.sum()):
        raise ValueError(
            f"sparsity {sparsity} removes {target} neurons but "
            f"max_branch_sparsity={max_branch_sparsity} "
            f"allows at most {int(limit.sum())}; raise the cap or lower the sparsity"
        )
    if target == 0:
        return [0] * b

    def removed(lam: float) -> float:
        return float((n * np.minimum(max_branch_sparsity, lam * p)).sum())

    lo, hi = 0.0, max_branch_sparsity / p.min()
    for _ in range(
        200
    ):  # bisection: removed() is monotone in λ; 200 halvings reach float64 precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
    real = np.minimum(n * np.minimum(max_branch_sparsity, hi * p), limit)
    counts = np.floor(real + 1e-9).astype(np.int64)
    short = target - int(counts.sum())
    # Largest remainder first; then any branch with room (caps can leave remainders unusable).
    for r in list(np.argsort(-(real - counts), kind="stable")) + list(
        np.argsort(-p, kind="stable")
    ):
        if short <= 0:
            break
        if counts[r] < limit[r]:
            counts[r] += 1
            short -= 1
    return [int(c) for c in counts]


def fractal_fade(
    moe: StaticMoE,
    sparsity: float,
    schedule: FadeSchedule = "linear",
    *,
    ratio: float = 4.0,
    max_branch_sparsity: float = 1.0,
    hidden_second_moment: Tensor | None = None,
) -> StaticMoE:
    """Differential branch sparsity: remove ``ceil(sparsity · N)`` neurons, more from less
    important branches (schedule in the module docstring and :func:`fade_schedule`); within a
    branch the lowest-energy neurons go. Returns a new StaticMoE (α unchanged); branches left
    empty are dropped."""
    ranks = _branch_ranks(moe, hidden_second_moment).tolist()
    sizes = moe.branch_sizes
    counts = fade_schedule(
        [sizes[b] for b in ranks],
        sparsity,
        schedule,
        ratio=ratio,
        max_branch_sparsity=max_branch_sparsity,
    )
    drop = dict(zip(ranks, counts))
    keep: list[tuple[int, Tensor]] = []
    for b in range(moe.num_branches):
        e = _branch_neuron_energy(moe, b, hidden_second_moment)
        order = torch.sort(e, descending=True, stable=True).indices
        keep.append((b, order[: sizes[b] - drop[b]].sort().values))
    return _rebuild(moe, keep, moe.alpha.detach())


def compensated_prune(
    moe: StaticMoE,
    keep: int | float,  # noqa: PYI041 - an int counts branches, a float is a fraction
    compensate: bool = True,
    *,
    hidden_second_moment: Tensor | None = None,
) -> StaticMoE:
    """Remove whole branches, keeping the most important ones, and (optionally) rescale the rest.

    Args:
        keep: an ``int`` = number of branches to keep (1..B), or a ``float`` in (0, 1] = fraction
            of branches (rounded to nearest, at least 1). ``1`` keeps one branch, ``1.0`` all.
        compensate: multiply every surviving α by ``c = sqrt(Σ_all α_b² E_b / Σ_kept α_b² E_b)`` so
            :func:`output_energy_proxy` is unchanged (derivation in the module docstring).
        hidden_second_moment: calibration statistics for ``E_b`` (ranking and compensation).

    Returns:
        A new StaticMoE with the kept branches in their original order.
    """
    b_all = moe.num_branches
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise TypeError(f"keep must be an int (branches) or a float (fraction), got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= b_all:
            raise ValueError(f"keep={keep} branches is outside [1, {b_all}]")
        n_keep = keep
    else:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} as a fraction must be in (0, 1]")
        n_keep = max(1, round(keep * b_all))
    energy = branch_energy(moe, hidden_second_moment)
    a = moe.alpha.detach().double()
    contrib = a.square() * energy
    kept = torch.sort(torch.sort(contrib, descending=True, stable=True).indices[:n_keep]).values
    gains = a[kept]
    if compensate:
        total, survived = float(contrib.sum()), float(contrib[kept].sum())
        if total > 0:
            if survived <= 0:
                raise ValueError(
                    "the surviving branches have zero energy proxy, so no gain can restore the "
                    "output "
                    "energy; keep more branches or use compensate=False"
                )
            gains = gains * math.sqrt(total / survived)
    plan = [(int(b), torch.arange(moe.branch_sizes[int(b)])) for b in kept]
    return _rebuild(moe, plan, gains.float())


def branch_map(moe: StaticMoE) -> tuple[Tensor, Tensor]:
    """The inspection form of ``moe``: ``(branch [source_size] int32, alpha [B] float32)`` where
    ``branch[i]`` is the branch of the dense MLP's neuron i, -1 where it was pruned. With the dense
    block's weights this is the whole StaticMoE (:func:`from_branch_map`); weights it only scales
    or prunes are not copied."""
    branch = torch.full((moe.source_size,), -1, dtype=torch.int32)
    for b in range(moe.num_branches):
        branch[moe.branch_index(b)] = b
    return branch, moe.alpha.detach().float().cpu().clone()


def from_branch_map(ff: FFWeights, branch: Tensor, alpha: Tensor) -> StaticMoE:
    """The StaticMoE that :func:`branch_map` describes, rebuilt from the dense block ``ff``."""
    if branch.shape != (ff.intermediate_size,):
        raise ValueError(f"branch map has {tuple(branch.shape)} entries for {ff.intermediate_size} neurons")
    idx = [torch.nonzero(branch == b).reshape(-1) for b in range(alpha.numel())]
    keep = [(b, i) for b, i in enumerate(idx) if i.numel()]
    return StaticMoE([_strip_b_down(ff.select(i)) for _, i in keep], [i for _, i in keep], ff.b_down,
                     ff.intermediate_size, alpha=alpha[[b for b, _ in keep]])


def to_dense(moe: StaticMoE) -> FFWeights:
    """A plain MLP with the surviving neurons: ``α_b`` folded into branch b's down columns,
    neurons in the dense MLP's original order, ``b_down`` once. Intermediate size =
    ``moe.intermediate_size``; ``to_dense(StaticMoE.from_dense(ff, B))`` returns ``ff``'s
    tensors."""
    ffs = [moe.branch_ff(b) for b in range(moe.num_branches)]
    index = torch.cat([moe.branch_index(b) for b in range(moe.num_branches)])
    order = torch.argsort(index).to(ffs[0].up.device)
    dtype = ffs[0].down.dtype
    acc = torch.promote_types(dtype, torch.float32)
    downs = [
        ff.down if float(a) == 1.0 else (ff.down.to(acc) * a.to(acc)).to(dtype)
        for ff, a in zip(ffs, moe.alpha.detach())
    ]

    def cat(tensors: list[Tensor | None], dim: int) -> Tensor | None:
        if tensors[0] is None:
            return None
        return torch.cat(tensors, dim).index_select(dim, order)  # type: ignore[arg-type]

    up = cat([ff.up for ff in ffs], 0)
    down = cat(downs, 1)
    assert up is not None and down is not None
    return FFWeights(
        up=up,
        down=down,
        act=moe.act,
        gate=cat([ff.gate for ff in ffs], 0),
        b_up=cat([ff.b_up for ff in ffs], 0),
        b_down=None if moe.b_down is None else moe.b_down.detach().clone(),
    )
