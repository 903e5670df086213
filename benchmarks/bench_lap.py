"""LAP time per layer pair: ``lap.lapjv`` vs ``scipy.optimize.linear_sum_assignment``.

A window of W layers solves W - 1 assignments (every non-anchor layer against the anchor), so the
time per window is (W - 1) x the per-pair times printed here; windows are independent and run in
parallel in the ``align`` stage.

Correlation matrices are built to look like the real ones (pre-activation FF features of two
adjacent layers on ~10k tokens) without running a model:

- the block input has an anisotropic covariance (power-law spectrum, a few outlier dimensions,
  as LLM residual streams do), diagonal w.l.o.g. since the weights are random;
- layer B's up rows are a hidden permutation of layer A's, each mixed with fresh weights:
  ``w_b = ρ w_a + sqrt(1 - ρ²) w_new`` with ρ ~ Beta(2, 3) (mean 0.4) in the "related" regime, ρ = 0
  in the "unrelated" one (only the shared input covariance correlates neurons: the hard case);
- corr = the population correlation ``W_a Σ W_bᵀ`` normalised, plus sampling noise N(0, 1/rows).

Both solvers run in child processes with a time limit (``--limit``, default 60 s): a solver that
does not finish is reported as skipped. The optimum (total matched correlation) is checked equal.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lap.py [--sizes 1536 3072 8192]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import queue
import time

import numpy as np

from mlpfuse.stages.math.assignment import assignment_total, solve_assignment

# (intermediate size, hidden size) pairs: SmolLM2-135M is 576/1536; the others keep I ≈ 4H.
HIDDEN_FOR = {1536: 576, 3072: 768, 8192: 2048, 14336: 4096}


def correlation_matrix(n: int, regime: str, rows: int = 10_000, seed: int = 0) -> np.ndarray:
    """A realistic [n, n] correlation matrix between two adjacent layers' FF features."""
    rng = np.random.default_rng(seed)
    h = HIDDEN_FOR.get(n, max(64, n // 4))
    spectrum = 1.0 / np.arange(1, h + 1) ** 0.8
    spectrum[rng.choice(h, 4, replace=False)] *= 50.0  # outlier dimensions
    w_a = rng.standard_normal((n, h)).astype(np.float32)
    if regime == "related":
        rho = rng.beta(2.0, 3.0, n).astype(np.float32)[:, None]
    elif regime == "unrelated":
        rho = np.zeros((n, 1), dtype=np.float32)
    else:
        raise ValueError(f"unknown regime {regime!r}; expected 'related' or 'unrelated'")
    w_b = (rho * w_a + np.sqrt(1 - rho**2) * rng.standard_normal((n, h)).astype(np.float32))[
        rng.permutation(n)
    ]
    sqrt_s = np.sqrt(spectrum).astype(np.float32)
    a, b = w_a * sqrt_s, w_b * sqrt_s
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    corr = (a @ b.T).astype(np.float64)
    corr += rng.standard_normal((n, n)) / np.sqrt(rows)
    return np.clip(corr, -1.0, 1.0)


_MATRIX: np.ndarray | None = None  # handed to forked children without pickling 0.5 GB


def _child(solver: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    assert _MATRIX is not None
    t0 = time.perf_counter()
    perm = solve_assignment(_MATRIX, maximize=True, solver=solver)  # type: ignore[arg-type]
    out.put((time.perf_counter() - t0, perm))


def timed(solver: str, limit: float) -> tuple[float, np.ndarray] | None:
    """(seconds, perm) for one solve in a forked child, or None past ``limit`` seconds."""
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_child, args=(solver, q))
    p.start()
    try:
        result = q.get(timeout=limit)
    except queue.Empty:  # past the limit
        result = None
    if result is None:
        p.terminate()
    p.join()
    return result


def _seconds(result: tuple[float, np.ndarray] | None, limit: float) -> str:
    return f"{result[0]:9.2f}" if result else f"{'>' + str(int(limit)):>9}"


def main() -> None:
    global _MATRIX
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1536, 3072, 8192])
    ap.add_argument("--regimes", nargs="+", default=["related", "unrelated"])
    ap.add_argument(
        "--limit", type=float, default=60.0, help="seconds per solve before it is skipped"
    )
    args = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, numpy {np.__version__}; "
        "one solve per cell, "
        f"limit {args.limit:.0f} s"
    )
    print(
        f"{'n':>6} {'regime':>10} {'build s':>8} {'lapjv s':>9} {'scipy s':>9} {'scipy/lap':>9} "
        f"{'mean matched corr':>18} {'same optimum':>13}"
    )
    for n in args.sizes:
        for regime in args.regimes:
            t0 = time.perf_counter()
            _MATRIX = correlation_matrix(n, regime)
            build = time.perf_counter() - t0
            lap_r, scipy_r = timed("lap", args.limit), timed("scipy", args.limit)
            ratio = f"{scipy_r[0] / lap_r[0]:9.1f}" if lap_r and scipy_r else f"{'-':>9}"
            totals = [assignment_total(_MATRIX, r[1]) for r in (lap_r, scipy_r) if r]
            same = (
                "yes"
                if len(totals) == 2
                and abs(totals[0] - totals[1]) <= 1e-9 * max(1.0, abs(totals[1]))
                else ("n/a" if len(totals) < 2 else f"NO ({totals[0] - totals[1]:+.2e})")
            )
            matched = f"{totals[0] / n:18.4f}" if totals else f"{'-':>18}"
            print(
                f"{n:>6} {regime:>10} {build:8.1f} {_seconds(lap_r, args.limit)} "
                f"{_seconds(scipy_r, args.limit)} {ratio} {matched} {same:>13}",
                flush=True,
            )


if __name__ == "__main__":
    main()
