"""The linear assignment problem (LAP) that FF merging solves: the permutation of one layer's
neurons (or experts) that best matches another's by correlation. ``lap`` (Jonker-Volgenant) where
installed, SciPy's ``linear_sum_assignment`` otherwise; both exact."""

from __future__ import annotations

import logging
from typing import Literal, TypeAlias

import numpy as np
from torch import Tensor

log = logging.getLogger(__name__)

Array: TypeAlias = np.ndarray | Tensor
Solver: TypeAlias = Literal["auto", "lap", "scipy"]


def check_square_finite(corr: np.ndarray) -> None:
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"the assignment needs a square [n, n] matrix, got shape {corr.shape}")
    if not np.isfinite(corr).all():
        bad = int((~np.isfinite(corr)).sum())
        raise ValueError(
            f"the assignment matrix has {bad} non-finite entries (NaN/inf); "
            "compute correlations with CorrelationAccumulator, which maps constant neurons to 0"
        )


def _is_permutation(perm: np.ndarray, n: int) -> bool:
    if perm.shape != (n,) or not ((perm >= 0) & (perm < n)).all():
        return False
    return bool((np.bincount(perm, minlength=n) == 1).all())


def _solve_lap(corr: np.ndarray, maximize: bool, overwrite: bool = False) -> np.ndarray:
    import lap

    # lapjv minimises; it is documented to misbehave on negative costs, so shift to >= 0 (a
    # constant shift does not change the optimal permutation of a square problem).
    shift = float(corr.max() if maximize else corr.min())
    if overwrite and corr.flags.c_contiguous and corr.flags.writeable:
        # The cost in corr's own memory, turned back into corr afterwards (to float rounding).
        cost = np.subtract(shift, corr, out=corr) if maximize else np.subtract(corr, shift, out=corr)
        try:
            _, x, _ = lap.lapjv(cost, extend_cost=False)
        finally:
            np.subtract(shift, cost, out=cost) if maximize else np.add(cost, shift, out=cost)
        return np.asarray(x, dtype=np.int64)
    cost = (shift - corr) if maximize else (corr - shift)
    _, x, _ = lap.lapjv(np.ascontiguousarray(cost, dtype=np.float64), extend_cost=False)
    return np.asarray(x, dtype=np.int64)


def _solve_scipy(corr: np.ndarray, maximize: bool) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr, maximize=maximize)
    perm = np.empty(corr.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def solve_assignment(corr: Array, maximize: bool = True, solver: Solver = "auto",
                     overwrite: bool = False) -> np.ndarray:
    """Optimal neuron matching for a square score matrix.

    Args:
        corr: [n, n] scores, rows the anchor's neurons, columns the other layer's.
        maximize: maximise (correlations) or minimise (costs) the total ``sum_j corr[j, perm[j]]``.
        solver: "lap" (``lap.lapjv``, Jonker-Volgenant, exact; 3-5x faster than scipy at n in the
            thousands), "scipy" (``scipy.optimize.linear_sum_assignment``, also exact), or "auto":
            lap, falling back to scipy when lap is not installed or returns no valid permutation.

        overwrite: a float64 numpy ``corr`` may serve as the solver's cost matrix (no second
            [n, n] copy) and is restored afterwards to float rounding.

    Returns:
        perm [n] int64: the other layer's neuron ``perm[j]`` matches anchor neuron ``j``.
        Both solvers reach the same optimal total (the permutation itself may differ on ties).
    """
    c = np.asarray(
        corr.detach().cpu().numpy() if isinstance(corr, Tensor) else corr, dtype=np.float64
    )
    check_square_finite(c)
    n = c.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if solver == "scipy":
        return _solve_scipy(c, maximize)
    if solver == "lap":
        perm = _solve_lap(c, maximize, overwrite)
        if not _is_permutation(perm, n):
            raise RuntimeError(
                f"lap.lapjv returned no valid permutation for an n={n} problem; use solver='scipy'"
            )
        return perm
    if solver != "auto":
        raise ValueError(f"unknown solver {solver!r}; expected 'auto', 'lap' or 'scipy'")
    try:
        perm = _solve_lap(c, maximize, overwrite)
    except ImportError:
        log.info("lap is not installed; solving the assignment with scipy")
        return _solve_scipy(c, maximize)
    if not _is_permutation(perm, n):
        log.warning("lap.lapjv returned an invalid assignment (n=%d); falling back to scipy", n)
        return _solve_scipy(c, maximize)
    return perm


def assignment_total(corr: Array, perm: Array) -> float:
    """``sum_j corr[j, perm[j]]`` (float64): the objective :func:`solve_assignment` optimises."""
    c = np.asarray(
        corr.detach().cpu().numpy() if isinstance(corr, Tensor) else corr, dtype=np.float64
    )
    p = np.asarray(
        perm.detach().cpu().numpy() if isinstance(perm, Tensor) else perm, dtype=np.int64
    )
    return float(c[np.arange(c.shape[0]), p].sum())

