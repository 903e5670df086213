"""Weighted k-means over float32 points with faiss, with guarantees the fusion math relies on.

What this adds to ``faiss.Kmeans``:

- every one of the ``k`` clusters is non-empty (a fused MLP has exactly ``k`` neurons, and an
  empty cluster would be a neuron with no members and no defined centroid);
- ``centroids[c]`` is exactly the (weighted) mean of the points assigned to ``c``: faiss returns
  the centroids of its last update step, whose assignment can differ from the final one;
- exact duplicates are clustered as one point with their weights summed (the same objective), so
  ``k`` >= the number of distinct points is solved exactly, without randomness: ``k == n`` puts
  each point in its own cluster with ``centroids == points``, and an MLP made of groups of
  duplicate neurons fuses back to exactly those groups;
- exactly ``iters`` Lloyd iterations per restart (faiss 1.15 otherwise stops as soon as the
  objective repeats), and no subsampling of the training set;
- greedy k-means++ seeding by default: faiss's uniform random seeding ends ~6% higher in
  inertia on real sub-MLP vectors (SmolLM2 layer 10, k=384), whatever the iterations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse

from mlpfuse.core.compute import current_compute
from mlpfuse.core.errors import NumericalError

KMeansInit = Literal["kmeans++", "random"]
KMEANS_INITS: tuple[KMeansInit, ...] = ("kmeans++", "random")
# faiss subsamples to max_points_per_centroid * k training points by default (256 * k); fusion
# clusters every neuron, so the cap must never bind.
_NO_SUBSAMPLING = 1 << 30
# Weights and scales are floored at this fraction of their maximum: a point of zero weight (a
# neuron that never fires) still needs a cluster, and a cluster of only such points would
# otherwise have no defined weighted mean.
WEIGHT_FLOOR = 1e-12


@dataclass(frozen=True)
class KMeansResult:
    """A k-means solution. ``centroids`` [k, d] float32, ``assign`` [n] int64 (every value in
    ``range(k)`` occurs), ``inertia`` = sum_i w_i * ||x_i - centroids[assign_i]||^2 (w = 1 when
    unweighted), ``iters`` = Lloyd iterations run over all restarts (0 for the exact path),
    ``seed`` the seed used."""

    centroids: np.ndarray
    assign: np.ndarray
    inertia: float
    iters: int
    seed: int


def kmeans(
    points: np.ndarray,
    k: int,
    *,
    iters: int,
    seed: int,
    weights: np.ndarray | None = None,
    n_init: int = 1,
    init: KMeansInit = "kmeans++",
    gpu: bool | None = None,
) -> KMeansResult:
    """Cluster ``points`` [n, d] into ``k`` non-empty clusters.

    ``weights`` [n] (non-negative, not all zero) weight each point in the objective and in the
    centroid means. ``n_init`` restarts keep the lowest objective. ``init``: "kmeans++" seeds
    each restart with :func:`greedy_kmeanspp`, "random" lets faiss sample the initial centroids
    uniformly from the points (its default; several percent higher inertia on real sub-MLPs).
    ``gpu``: None uses a GPU when faiss sees one, True requires one, False never uses one.
    Without faiss (a machine with only PyTorch), or when the task holds a GPU that faiss-cpu
    cannot use, the same weighted Lloyd iterations run in torch on the task's device (seeded by
    greedy k-means++ whatever ``init`` says).
    """
    x = np.ascontiguousarray(points, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"points must be a 2-D array [n, d], got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(
            f"k must be in [1, n] = [1, {n}] (one cluster needs at least one point), got k={k}"
        )
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    if iters < 1 or n_init < 1:
        raise ValueError(f"iters and n_init must be >= 1, got iters={iters}, n_init={n_init}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise NumericalError(
            f"k-means input has NaN/inf in {bad.size} of {n} points "
            f"(first rows: {bad[:5].tolist()})"
        )
    w = check_weights(weights, n)

    # Cluster the distinct points, each weighted by the total weight of its copies: the same
    # objective, and it makes k >= (number of distinct points) an exact, deterministic case.
    uniq, inverse = _unique_rows(x)
    w_uniq = np.bincount(inverse, weights=w, minlength=len(uniq))
    if len(uniq) <= k:
        assign_u = np.arange(len(uniq), dtype=np.int64)
        n_iters = 0
    elif (device := _torch_device(gpu)) is not None:
        assign_u, n_iters = _torch_assign(uniq, w_uniq, k, iters=iters, seed=seed, n_init=n_init, device=device)
    else:
        assign_u, n_iters = _faiss_assign(
            uniq, w_uniq, k, iters=iters, seed=seed, n_init=n_init, init=init, gpu=gpu
        )
    assign = assign_u[inverse]
    assign = _fill_empty_clusters(x, w, assign, k)
    centroids = weighted_means(x, assign, w, k)
    inertia = 0.0
    for a, b in _row_blocks(x):  # float64 in blocks: no float64 copy of the whole point set
        diff = x[a:b].astype(np.float64) - centroids[assign[a:b]]
        inertia += float(np.einsum("n,nd,nd->", w[a:b], diff, diff))
    return KMeansResult(centroids.astype(np.float32), assign, inertia, n_iters, seed)


def weighted_means(x: np.ndarray, assign: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster weighted means [k, d] float64 of ``x`` [n, d] under ``assign`` [n]; every
    cluster must have positive total weight."""
    onehot = scipy.sparse.csr_matrix((w, (assign, np.arange(len(assign)))), shape=(k, len(assign)))
    total = np.asarray(onehot.sum(axis=1)).ravel()
    if (total <= 0).any():
        raise ValueError(f"clusters {np.flatnonzero(total <= 0)[:5].tolist()} have no weight")
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for a, b in _row_blocks(x):
        sums += onehot[:, a:b] @ x[a:b].astype(np.float64)
    return sums / total[:, None]


def _row_blocks(x: np.ndarray, max_bytes: int = 64 << 20) -> Iterator[tuple[int, int]]:
    """Row ranges of ``x`` whose float64 copy is about ``max_bytes``."""
    step = max(1, max_bytes // max(1, 8 * int(np.prod(x.shape[1:]))))
    for a in range(0, len(x), step):
        yield a, min(a + step, len(x))


def check_weights(weights: np.ndarray | None, n: int, name: str = "weights") -> np.ndarray:
    """Per-point weights [n] as float64 (ones when None), floored at ``WEIGHT_FLOOR`` * max;
    a ValueError naming ``name`` unless finite, non-negative and not all zero."""
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one per point/neuron), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.max() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero")
    return np.maximum(w, WEIGHT_FLOOR * w.max())


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows in order of first occurrence, and each row's index into them."""
    _, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts lexicographically; keep the input's order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return x[first[order]], rank[inverse.ravel()].astype(np.int64)


def _torch_device(gpu: bool | None) -> str | None:
    """Where the torch Lloyd iterations run, or None for faiss: faiss when it is installed, unless
    the task holds a GPU that faiss cannot use (faiss-cpu); torch, on the task's device, when faiss
    is absent (a machine with only PyTorch)."""
    try:
        import faiss
    except ImportError:
        return "cuda" if gpu is not False and current_compute().device == "cuda" else "cpu"
    if gpu is not False and faiss.get_num_gpus() == 0 and current_compute().device == "cuda":
        return "cuda"
    return None


def _torch_assign(x: np.ndarray, w: np.ndarray, k: int, *, iters: int, seed: int, n_init: int,
                  device: str) -> tuple[np.ndarray, int]:
    """Weighted Lloyd iterations in torch (float32 distances, float64 centroid sums) from greedy
    k-means++ seeds, on ``device``: the best restart's assignment [n] and the iterations run."""
    import torch

    xt = torch.from_numpy(x).to(device)
    wt = torch.from_numpy(w).to(device=device, dtype=torch.float64)
    sq = (xt * xt).sum(1)

    def nearest(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist, idx = [], []
        step = max(1, (64 << 20) // (4 * max(k, 1)))  # [rows, k] float32 blocks of ~64 MB
        csq = (c * c).sum(1)
        for a in range(0, len(xt), step):
            d = (sq[a : a + step, None] + csq[None, :] - 2 * xt[a : a + step] @ c.T).clamp_min_(0)
            m = d.min(1)
            dist.append(m.values)
            idx.append(m.indices)
        return torch.cat(dist), torch.cat(idx)

    best: tuple[float, np.ndarray] | None = None
    for r in range(n_init):
        c = torch.from_numpy(greedy_kmeanspp(x, w, k, np.random.default_rng([seed, r]))).to(device)
        for _ in range(iters):
            _, a = nearest(c)
            sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, a, xt.double() * wt[:, None])
            tot = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, a, wt)
            keep = tot > 0  # an emptied cluster keeps its centre (filled after, as with faiss)
            c[keep] = (sums[keep] / tot[keep, None]).float()
        dist, a = nearest(c)
        obj = float((wt * dist.double()).sum())
        if best is None or obj < best[0]:
            best = (obj, a.cpu().numpy().astype(np.int64))
    assert best is not None
    return best[1], iters * n_init


def _faiss_assign(
    x: np.ndarray,
    w: np.ndarray,
    k: int,
    *,
    iters: int,
    seed: int,
    n_init: int,
    init: KMeansInit,
    gpu: bool | None,
) -> tuple[np.ndarray, int]:
    """faiss Lloyd iterations from ``init``; the best restart's nearest-centroid assignment [n]
    and the iterations run over all restarts."""
    import faiss

    num_gpus = faiss.get_num_gpus()
    if gpu and num_gpus == 0:
        raise RuntimeError(
            "gpu=True but faiss sees no GPU (faiss-cpu installed, or no CUDA device); "
            "pass gpu=None or gpu=False"
        )
    params: dict[str, object] = {
        "niter": iters,
        "seed": seed,
        "verbose": False,
        "min_points_per_centroid": 1,
        "max_points_per_centroid": _NO_SUBSAMPLING,
        "gpu": bool(num_gpus > 0 if gpu is None else gpu),
    }
    if hasattr(faiss.ClusteringParameters(), "early_stop_threshold"):
        # 0 (the default) stops when the objective repeats; a negative threshold never fires, so
        # the iteration count the caller asked for is the one that runs.
        params["early_stop_threshold"] = -1.0
    w32 = w.astype(np.float32)
    if init == "random":  # faiss samples the initial centroids and runs the restarts itself
        km = faiss.Kmeans(x.shape[1], k, nredo=n_init, **params)
        km.train(x, weights=w32)
        return km.assign(x)[1].astype(np.int64), len(km.iteration_stats or ())
    best: tuple[float, np.ndarray] | None = None
    n_iters = 0
    for r in range(n_init):
        km = faiss.Kmeans(x.shape[1], k, nredo=1, **params)
        km.train(
            x,
            weights=w32,
            init_centroids=greedy_kmeanspp(x, w, k, np.random.default_rng([seed, r])),
        )
        n_iters += len(km.iteration_stats or ())
        dist, assign = km.assign(x)
        obj = float(np.dot(w, dist))
        if best is None or obj < best[0]:
            best = (obj, assign.astype(np.int64))
    assert best is not None
    return best[1], n_iters


def greedy_kmeanspp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the variant scikit-learn uses):
    each new centre is the best, by weighted potential, of ``2 + ln k`` candidates sampled with
    probability proportional to ``w * D^2``. Returns k rows of ``x`` [k, d], distinct when the
    rows of ``x`` are (as :func:`kmeans` ensures).

    Costs about ``(2 + ln k) / iters`` of the Lloyd iterations that follow, and on sub-MLP
    vectors starts them where they end far lower than from uniformly sampled centres (see
    benchmarks/bench_kmeans.py).
    """
    n = len(x)
    trials = 2 + int(np.log(k))
    sq = np.einsum("nd,nd->n", x, x)

    def dist2(rows: np.ndarray) -> np.ndarray:  # [len(rows), n]
        return np.maximum(sq[rows][:, None] + sq[None, :] - 2 * (x[rows] @ x.T), 0)

    centres = [int(rng.choice(n, p=w / w.sum()))]
    closest = dist2(np.array(centres))[0].astype(np.float64)
    closest[centres[0]] = 0.0
    for _ in range(1, k):
        cum = np.cumsum(w * closest)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        d = np.minimum(closest[None, :], dist2(cand))
        d[np.arange(trials), cand] = 0.0  # exact zero where float rounding leaves a residue
        best = int(np.argmin(d @ w))
        centres.append(int(cand[best]))
        closest = d[best]
    return np.ascontiguousarray(x[centres])


def _fill_empty_clusters(x: np.ndarray, w: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster half of the currently largest cluster (by point count).

    The largest cluster then has >= 2 points (n >= k and some cluster is empty). Its members are
    split along the direction from its mean to its farthest member, so the split separates
    them where they differ; identical members are split by position.
    """
    assign = assign.copy()
    counts = np.bincount(assign, minlength=k)
    for empty in np.flatnonzero(counts == 0):
        big = int(np.argmax(counts))
        members = np.flatnonzero(assign == big)
        xm = x[members].astype(np.float64)
        centred = xm - np.average(xm, axis=0, weights=w[members])
        far = centred[np.argmax(np.einsum("nd,nd->n", centred, centred))]
        proj = centred @ far  # all zero when the members are identical: stable sort keeps order
        moved = members[np.argsort(-proj, kind="stable")[: len(members) // 2]]
        assign[moved] = empty
        counts[big] -= len(moved)
        counts[empty] = len(moved)
    return assign
