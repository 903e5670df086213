"""FF merging math: correlate, align (LAP), permute and average feed-forward sublayers.

Method (Merging Feed-Forward Sublayers for Compressed Transformers, 2025; ``align`` in DESIGN.md):
for a window of adjacent FF sublayers, collect each layer's features *before the activation*
(the output of ``up_proj``/``c_fc``/``fc1``, bias included) on the same calibration tokens,
compute the Pearson correlation of every non-anchor layer's neurons with the anchor's,

    corr[i, j] = cov(F_anchor[:, i], F_other[:, j]) / (std(F_anchor[:, i]) * std(F_other[:, j])),

solve the linear assignment problem ``max_perm sum_j corr[j, perm[j]]`` for the permutation that
lines the other layer's neurons up with the anchor's, permute the other layer (rows of
up/gate/b_up, columns of down: the function is unchanged), and average the window's tensors. The
averaged block is then tied: every layer of the window uses it.

Conventions used throughout:

- ``corr`` is [n_anchor, n_other]: rows index the anchor's neurons, columns the other layer's.
- ``perm[j]`` is the other layer's neuron that matches anchor neuron ``j``, so
  ``permute_ff(other, perm)`` puts the match of anchor neuron ``j`` at position ``j``
  (``FFWeights.select(perm)`` semantics). The anchor's own permutation is the identity.

Everything here is plain functions over :class:`~mlpfuse.stages.math.ffweights.FFWeights`, numpy and torch; the
``align`` stage wraps them (and solves windows in parallel, since windows are independent).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

from mlpfuse.stages.math.assignment import (
    Solver,
    assignment_total,
    check_square_finite,
    solve_assignment,
)
from mlpfuse.stages.math.ffweights import FFWeights

log = logging.getLogger(__name__)

Array: TypeAlias = np.ndarray | Tensor
#: A layer's features: a matrix [rows, n] or a zero-argument callable returning an iterable of
#: row blocks [rows_k, n] (e.g. reading a Parquet file batch by batch). All sources of one window
#: must cover the same token rows in the same order; block boundaries may differ.
FeatureSource: TypeAlias = Array | Callable[[], Iterable[Array]]


# A neuron whose standard deviation is below this fraction of |mean| (or exactly 0) is treated as
# constant: float32 inputs cannot resolve relative variation below ~6e-8, so anything smaller is
# rounding in the float64 accumulation, not signal.
_CONSTANT_RTOL = 1e-9


def _as_tensor(x: Array, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    # numpy views with negative strides (x[:, ::-1]) cannot be wrapped by torch without a copy.
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix [rows, features], got shape {tuple(t.shape)}"
        )
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t.to(device=device, dtype=dtype)


def _chan_merge(
    n1: int, n2: int, c1: Tensor, c2: Tensor, d_a: Tensor, d_b: Tensor, outer: bool
) -> Tensor:
    """Merge two centred co-moment sums (Chan et al. parallel update), into ``c1`` in place.

    ``c`` = sum over rows of (a - mean_a)(b - mean_b) for each part; ``d_a``/``d_b`` are the
    differences of the parts' means. ``outer`` selects a full [n_a, n_b] co-moment matrix versus
    an elementwise (diagonal, a is b) one. Exact in exact arithmetic; unlike summing raw ``AᵀB``
    and subtracting ``n·μμᵀ`` at the end, it does not cancel catastrophically when |mean| >> std.
    """
    coef = n1 * n2 / (n1 + n2)
    c1 += c2
    # A rank-1 update in place: no [n_a, n_b] temporary (8192² float64 is 0.5 GB).
    return c1.addr_(d_a, d_b, alpha=coef) if outer else c1.add_(d_a * d_b, alpha=coef)


class CorrelationAccumulator:
    """Streamed Pearson correlation between two feature sets seen in row blocks.

    Keeps, in float64: the row count, the means of A [n_a] and B [n_b], the centred sums of
    squares [n_a], [n_b] and the centred co-moment matrix [n_a, n_b] (blocks are merged with
    Chan's parallel update). Memory is O(n_a * n_b) whatever the number of rows: 512 MiB at
    n = 8192, 1.5 GiB at 14336. Accumulators fed disjoint rows can be :meth:`merge`-d.

    Args:
        n_a, n_b: feature counts of A and B.
        compute_dtype: dtype of the per-block centred product (the expensive part, rows*n_a*n_b).
            float64 by default; float32 roughly halves the time on CPU and is accurate to ~1e-6
            because blocks are centred before the product. The running sums stay float64.
        device: where the state lives and the products run (a GPU for large n).
    """

    def __init__(
        self,
        n_a: int,
        n_b: int,
        *,
        compute_dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_a < 1 or n_b < 1:
            raise ValueError(f"feature counts must be >= 1, got n_a={n_a}, n_b={n_b}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}"
            )
        self.n_a, self.n_b = n_a, n_b
        self.compute_dtype = compute_dtype
        self.device = torch.device(device)
        self._reset()

    def _reset(self) -> None:
        """No rows seen. The [n_a, n_b] co-moment sums are the first part's own (no zero matrix
        is allocated beside them)."""
        dev = self.device
        self.n_rows = 0
        self.mean_a = torch.zeros(self.n_a, dtype=torch.float64, device=dev)
        self.mean_b = torch.zeros(self.n_b, dtype=torch.float64, device=dev)
        self.m2_a = torch.zeros(self.n_a, dtype=torch.float64, device=dev)
        self.m2_b = torch.zeros(self.n_b, dtype=torch.float64, device=dev)
        self.c_ab = torch.zeros((0, 0), dtype=torch.float64, device=dev)

    def update(self, a: Array, b: Array) -> None:
        """Add a block of rows: ``a`` [rows, n_a] and ``b`` [rows, n_b] for the same tokens."""
        a_t = _as_tensor(a, "A", self.device, torch.float64)
        b_t = _as_tensor(b, "B", self.device, torch.float64)
        if a_t.shape[1] != self.n_a or b_t.shape[1] != self.n_b:
            raise ValueError(
                f"block widths {a_t.shape[1]}, {b_t.shape[1]} do not match the accumulator's "
                f"n_a={self.n_a}, n_b={self.n_b}"
            )
        if a_t.shape[0] != b_t.shape[0]:
            raise ValueError(
                f"A and B blocks must cover the same token rows, got {a_t.shape[0]} and "
                f"{b_t.shape[0]} rows"
            )
        n2 = int(a_t.shape[0])
        if n2 == 0:
            return
        mu_a, mu_b = a_t.mean(0), b_t.mean(0)
        ac, bc = a_t - mu_a, b_t - mu_b
        m2_a, m2_b = (ac * ac).sum(0), (bc * bc).sum(0)
        c_ab = (ac.to(self.compute_dtype).T @ bc.to(self.compute_dtype)).to(torch.float64)
        del ac, bc
        self._merge_stats(n2, mu_a, mu_b, m2_a, m2_b, c_ab, owned=True)

    def merge(self, other: CorrelationAccumulator) -> None:
        """Fold in an accumulator that saw *different* rows of the same two feature sets."""
        if (other.n_a, other.n_b) != (self.n_a, self.n_b):
            raise ValueError(
                f"cannot merge a ({other.n_a}, {other.n_b}) accumulator into a "
                f"({self.n_a}, {self.n_b}) one"
            )
        if other.n_rows == 0:
            return
        dev = self.device
        self._merge_stats(
            other.n_rows,
            other.mean_a.to(dev),
            other.mean_b.to(dev),
            other.m2_a.to(dev),
            other.m2_b.to(dev),
            other.c_ab.to(dev),
        )

    def _merge_stats(
        self, n2: int, mu_a: Tensor, mu_b: Tensor, m2_a: Tensor, m2_b: Tensor, c_ab: Tensor,
        owned: bool = False,
    ) -> None:
        """Fold in another part's statistics (``owned``: the tensors are this call's to keep)."""
        n1 = self.n_rows
        if n1 == 0:
            keep = (lambda t: t) if owned else (lambda t: t.clone())
            self.mean_a, self.mean_b = keep(mu_a), keep(mu_b)
            self.m2_a, self.m2_b, self.c_ab = keep(m2_a), keep(m2_b), keep(c_ab)
            self.n_rows = n2
            return
        d_a, d_b = mu_a - self.mean_a, mu_b - self.mean_b
        self.c_ab = _chan_merge(n1, n2, self.c_ab, c_ab, d_a, d_b, outer=True)
        self.m2_a = _chan_merge(n1, n2, self.m2_a, m2_a, d_a, d_a, outer=False)
        self.m2_b = _chan_merge(n1, n2, self.m2_b, m2_b, d_b, d_b, outer=False)
        n = n1 + n2
        self.mean_a = self.mean_a + d_a * (n2 / n)
        self.mean_b = self.mean_b + d_b * (n2 / n)
        self.n_rows = n

    def std_a(self) -> Tensor:
        """Population standard deviation of A's features [n_a] (float64)."""
        return (self.m2_a / max(self.n_rows, 1)).sqrt()

    def std_b(self) -> Tensor:
        """Population standard deviation of B's features [n_b] (float64)."""
        return (self.m2_b / max(self.n_rows, 1)).sqrt()

    def corr(self, consume: bool = False) -> np.ndarray:
        """Pearson correlation [n_a, n_b] (float64 numpy), rows A's features, columns B's.

        ``consume``: computed in place in the co-moment sums, which the accumulator gives up (it
        is empty afterwards): no second [n_a, n_b] matrix.

        A neuron that is constant over the rows seen (dead, or a float rounding of constant)
        has no defined correlation; it gets 0 everywhere, so the LAP treats it as matching
        nothing in particular rather than receiving NaN.
        """
        if self.n_rows < 2:
            raise ValueError(
                f"correlation needs at least 2 rows, this accumulator saw {self.n_rows}"
            )
        sd_a, sd_b = self.std_a(), self.std_b()
        live_a = sd_a > _CONSTANT_RTOL * self.mean_a.abs()
        live_b = sd_b > _CONSTANT_RTOL * self.mean_b.abs()
        sd_a = torch.where(live_a, sd_a, torch.ones_like(sd_a))
        sd_b = torch.where(live_b, sd_b, torch.ones_like(sd_b))
        # In place and by broadcasting: one [n_a, n_b] temporary besides c_ab (8192² float64 is
        # 0.5 GB), none when consumed.
        if consume:
            r = self.c_ab
            r /= self.n_rows
            self._reset()
        else:
            r = self.c_ab / self.n_rows
        r /= sd_a[:, None]
        r /= sd_b[None, :]
        r[~live_a] = 0.0
        r[:, ~live_b] = 0.0
        # Rounding can push |r| a hair past 1; the LAP does not care but consumers (plots) might.
        return r.clamp_(-1.0, 1.0).cpu().numpy()

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Plain numpy state (copies: the sums are updated in place), to write beside collected
        features (``collect``) and reload."""
        c_ab = self.c_ab if self.n_rows else torch.zeros(self.n_a, self.n_b, dtype=torch.float64)
        return {
            "n_rows": self.n_rows,
            **{k: getattr(self, k).cpu().numpy().copy() for k in ("mean_a", "mean_b", "m2_a", "m2_b")},
            "c_ab": c_ab.cpu().numpy().copy(),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, np.ndarray | int], *, device: torch.device | str = "cpu"
    ) -> CorrelationAccumulator:
        c_ab = np.asarray(state["c_ab"])
        acc = cls(int(c_ab.shape[0]), int(c_ab.shape[1]), device=device)
        acc.n_rows = int(state["n_rows"])
        for key in ("mean_a", "mean_b", "m2_a", "m2_b", "c_ab"):
            setattr(
                acc,
                key,
                # A copy: merges update the sums in place, never the caller's arrays.
                torch.tensor(np.asarray(state[key]), dtype=torch.float64, device=acc.device),
            )
        return acc


# --------------------------------------------------------------------------------------------
# Linear assignment
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Permute and merge
# --------------------------------------------------------------------------------------------


def _perm_tensor(perm: Array | Sequence[int], n: int, device: torch.device) -> Tensor:
    p = torch.as_tensor(np.asarray(perm) if not isinstance(perm, Tensor) else perm).to(torch.long)
    if p.ndim != 1 or p.numel() != n:
        raise ValueError(
            f"a permutation of {n} neurons must have shape [{n}], got {tuple(p.shape)}"
        )
    if n and (p.min() < 0 or p.max() >= n or torch.bincount(p, minlength=n).max() != 1):
        raise ValueError(
            f"perm is not a permutation of range({n}): values repeat or fall outside it"
        )
    return p.to(device)


def permute_ff(ff: FFWeights, perm: Array | Sequence[int]) -> FFWeights:
    """Reorder ``ff``'s intermediate neurons: new neuron ``j`` is old neuron ``perm[j]``.

    Rows of up/gate/b_up and columns of down move together, so ``ff.forward`` is unchanged (up
    to float summation order). ``perm`` [I] must be a permutation of ``range(I)``.
    """
    return ff.select(_perm_tensor(perm, ff.intermediate_size, ff.up.device))


def _check_compatible(ref: FFWeights, ff: FFWeights, k: int) -> None:
    """Block ``k`` of a window can be averaged with block 0 (``ref``)."""
    if ff.up.shape != ref.up.shape or ff.down.shape != ref.down.shape:
        raise ValueError(
            f"FF block {k} has up {tuple(ff.up.shape)}/down {tuple(ff.down.shape)}, "
            f"block 0 has up {tuple(ref.up.shape)}/down {tuple(ref.down.shape)}; "
            "merged blocks need equal shapes"
        )
    if ff.act != ref.act:
        raise ValueError(
            f"FF block {k} uses activation {ff.act!r}, block 0 {ref.act!r}; cannot merge them"
        )
    for name in ("gate", "b_up", "b_down"):
        if (getattr(ff, name) is None) != (getattr(ref, name) is None):
            raise ValueError(
                f"FF block {k} and block 0 disagree on having {name}; cannot merge them"
            )


def merge_window(
    ffs: Iterable[FFWeights],
    perms: Sequence[Array | Sequence[int] | None],
    weights: Sequence[float] | None = None,
) -> FFWeights:
    """Permute each FF block, then average every tensor (biases too) across the window.

    Args:
        ffs: the window's blocks, all the same shape and activation; any iterable, consumed one
            block at a time (a generator reading each layer as it is needed holds one block).
        perms: one per block; ``None`` leaves that block unpermuted ("vanilla" merging, the
            paper's no-alignment baseline). The anchor's entry is the identity or ``None``.
        weights: non-negative averaging weights, normalised to sum 1; uniform when omitted.

    Returns:
        The merged block, in the dtype of the first block (the average is taken in at least
        float32, so bf16 inputs are not averaged in bf16).
    """
    n = len(perms)
    if isinstance(ffs, Sequence) and len(ffs) != n:
        raise ValueError(f"got {n} perms for {len(ffs)} FF blocks; pass one (or None) per block")
    if weights is None:
        w = [1.0 / max(n, 1)] * n
    else:
        if len(weights) != n:
            raise ValueError(f"got {len(weights)} weights for {n} perms")
        if any(not math.isfinite(x) or x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(
                f"weights must be finite, non-negative and not all zero, got {list(weights)}"
            )
        total = float(sum(weights))
        w = [float(x) / total for x in weights]
    names = ("up", "down", "gate", "b_up", "b_down")
    first: FFWeights | None = None
    sums: dict[str, Tensor | None] = {}
    seen = 0
    for k, ff in enumerate(ffs):
        if k >= n:
            raise ValueError(f"got more FF blocks than the {n} perms; pass one (or None) per block")
        if first is None:
            first = ff
            acc_dtype = torch.promote_types(ff.up.dtype, torch.float32)
            sums = {name: None if getattr(ff, name) is None
                    else torch.zeros_like(getattr(ff, name), dtype=acc_dtype) for name in names}
        else:
            _check_compatible(first, ff, k)
        aligned = ff if perms[k] is None else permute_ff(ff, perms[k])  # type: ignore[arg-type]
        for name, total_t in sums.items():
            if total_t is not None:
                total_t.add_(getattr(aligned, name).to(total_t.dtype), alpha=w[k])
        del aligned
        seen += 1
    if first is None:
        raise ValueError("merge_window needs at least one FF block")
    if seen != n:
        raise ValueError(f"got {n} perms for {seen} FF blocks; pass one (or None) per block")
    out_dtype = first.up.dtype
    out = {name: None if t is None else t.to(out_dtype) for name, t in sums.items()}
    return replace(first, **out)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Window alignment from features
# --------------------------------------------------------------------------------------------


def _iter_blocks(source: FeatureSource, block_rows: int) -> Iterator[Array]:
    if callable(source):
        yield from source()
        return
    rows = int(source.shape[0])
    for start in range(0, rows, block_rows):
        yield source[start : start + block_rows]


def _zip_rows(
    a_blocks: Iterator[Array], b_blocks: Iterator[Array], what: str
) -> Iterator[tuple[Array, Array]]:
    """Pair two block streams over the same rows, re-cutting where their block sizes differ."""
    a: Array | None = None
    b: Array | None = None
    seen = 0
    while True:
        while a is None or len(a) == 0:
            a = next(a_blocks, None)
            if a is None:
                break
        while b is None or len(b) == 0:
            b = next(b_blocks, None)
            if b is None:
                break
        if a is None or b is None:
            if a is not None or b is not None:
                left = len(a) if a is not None else len(b)  # type: ignore[arg-type]
                raise ValueError(
                    f"{what}: feature sources cover different numbers of token rows "
                    f"(they agree on {seen}, then one has {left}+ more); all layers of a window "
                    "must be collected on the same tokens"
                )
            return
        k = min(len(a), len(b))
        yield a[:k], b[:k]
        seen += k
        a, b = a[k:], b[k:]


@dataclass(frozen=True)
class WindowAlignment:
    """Result of :func:`align_window` for a window of W layers.

    Attributes:
        anchor_index: position of the anchor within the window.
        perms: W int64 arrays [I]; ``perms[anchor_index]`` is the identity.
        matched_corr: W floats, mean over anchor neurons j of ``corr[j, perm[j]]``; 1.0 for the
            anchor by definition.
        identity_corr: W floats, the same mean without permuting (``corr[j, j]``): what vanilla
            merging lines up. ``matched_corr - identity_corr`` is what alignment bought.
        n_rows: token rows the correlations were computed on.
    """

    anchor_index: int
    perms: list[np.ndarray]
    matched_corr: list[float]
    identity_corr: list[float]
    n_rows: int


def align_window(
    features: Sequence[FeatureSource],
    anchor_index: int = 0,
    *,
    solver: Solver = "auto",
    block_rows: int = 4096,
    compute_dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> WindowAlignment:
    """Align every layer of a window to its anchor by feature correlation and LAP.

    Args:
        features: per layer, its pre-activation FF features on the same token rows: a matrix
            [rows, I] or a callable returning row blocks [rows_k, I] (read lazily; the anchor's
            source is read once per non-anchor layer).
        anchor_index: which layer the others are aligned to (the paper uses the first; its
            ablation finds first/middle/last equivalent).
        solver: see :func:`solve_assignment`.
        block_rows: rows per block when slicing matrix sources (bounds the float64 temporaries).
        compute_dtype, device: passed to :class:`CorrelationAccumulator`.

    Memory: one [I, I] float64 matrix at a time (pairs are processed one after another): the
    co-moment sums become the correlation, then the LAP cost, in place.
    """
    w = len(features)
    if w == 0:
        raise ValueError("align_window needs at least one layer's features")
    if not 0 <= anchor_index < w:
        raise ValueError(f"anchor_index={anchor_index} is outside the window of {w} layers")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    perms: list[np.ndarray] = []
    matched: list[float] = []
    identity: list[float] = []
    n_rows = 0
    n_neurons: int | None = None
    for k, source in enumerate(features):
        if k == anchor_index:
            perms.append(np.empty(0, dtype=np.int64))  # filled once I is known
            matched.append(1.0)
            identity.append(1.0)
            continue
        acc: CorrelationAccumulator | None = None
        pairs = _zip_rows(
            iter(_iter_blocks(features[anchor_index], block_rows)),
            iter(_iter_blocks(source, block_rows)),
            f"layer {k} vs anchor {anchor_index}",
        )
        for a_blk, b_blk in pairs:
            if acc is None:
                acc = CorrelationAccumulator(
                    int(a_blk.shape[1]),
                    int(b_blk.shape[1]),
                    compute_dtype=compute_dtype,
                    device=device,
                )
            acc.update(a_blk, b_blk)
        if acc is None:
            raise ValueError(
                f"layer {k} and anchor {anchor_index}: the feature sources yielded no rows"
            )
        if acc.n_a != acc.n_b:
            raise ValueError(
                f"layer {k} has {acc.n_b} FF neurons, the anchor {acc.n_a}; "
                "only equal widths can be aligned"
            )
        if n_rows and acc.n_rows != n_rows:
            raise ValueError(f"layer {k} covers {acc.n_rows} token rows, earlier layers {n_rows}")
        n_rows, n_neurons = acc.n_rows, acc.n_a
        corr = acc.corr(consume=True)  # in the accumulator's own [I, I] sums
        acc = None
        perm = solve_assignment(corr, maximize=True, solver=solver, overwrite=True)
        perms.append(perm)
        matched.append(assignment_total(corr, perm) / corr.shape[0])
        identity.append(float(np.trace(corr)) / corr.shape[0])
        del corr  # gone before the next pair's sums are made
    if n_neurons is None:  # a window of one layer: nothing to align, only its width to read
        first = next(iter(_iter_blocks(features[0], block_rows)), None)
        if first is None:
            raise ValueError("the anchor's feature source yielded no rows")
        n_neurons = int(first.shape[1])
    perms[anchor_index] = np.arange(n_neurons, dtype=np.int64)
    return WindowAlignment(anchor_index, perms, matched, identity, n_rows)


def match_experts(
    anchor_outputs: Sequence[Tensor], other_outputs: Sequence[Tensor], *, solver: Solver = "auto"
) -> tuple[np.ndarray, float, float]:
    """One-to-one matching of two MoE layers' experts by the correlation of their outputs.

    ``anchor_outputs[e]`` / ``other_outputs[f]``: expert e's (f's) output [n, H] on its own layer's
    inputs at the same n calibration tokens. The score of a pair is the Pearson correlation of the
    two outputs, each centred per output dimension and flattened over tokens and dimensions; the
    matching maximises the total score (LAP over the [E, E] score matrix).

    Returns ``(perm, matched, identity)``: merged expert ``e`` takes the other layer's expert
    ``perm[e]``; the mean score of the matched pairs and of the unpermuted pairs.
    """
    if len(anchor_outputs) != len(other_outputs) or not anchor_outputs:
        raise ValueError(f"got {len(anchor_outputs)} anchor experts and {len(other_outputs)} others")

    def unit(y: Tensor) -> Tensor:
        y = y.to(torch.float32)
        y = (y - y.mean(0, keepdim=True)).reshape(-1)
        return y / y.norm().clamp_min(1e-30)

    a = torch.stack([unit(y) for y in anchor_outputs])  # [E, n*H], one layer's experts at a time
    score = torch.stack([a @ unit(y) for y in other_outputs], dim=1).double().numpy()  # [E_anchor, E_other]
    check_square_finite(score)
    perm = solve_assignment(score, maximize=True, solver=solver)
    e = score.shape[0]
    return perm, assignment_total(score, perm) / e, float(np.trace(score)) / e
