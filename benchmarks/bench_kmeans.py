"""k-means for MLP Fusion on real weights: mlpfuse.stages.math.kmeans (faiss) vs scikit-learn KMeans.

The sub-MLPs of one SmolLM2-135M-Instruct layer (1536 neurons, 3 x 576 = 1728 dims each, SwiGLU)
are clustered into k centroids by both, at the same restarts and iteration budget (mlpfuse.stages.math.kmeans
with each of its seedings: greedy k-means++, the default, and faiss's uniform random), and by
scikit-learn at the authors' reference setting (n_init=30, its default max_iter=300, tol=1e-4).
scikit-learn seeds with greedy k-means++ and stops when the labels stop changing;
mlpfuse.stages.math.kmeans always runs the iterations it is given.
Inertia = sum of squared distances of the sub-MLP vectors to their assigned centroid (lower is
better), computed the same way for every row.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kmeans.py [--layer 10 --k 384 ...]

The de-quantised model is cached as a safetensors directory (``--cache``) so only the first run
pays the ~17 s GGUF load.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from mlpfuse.stages.math.fusion import sub_mlp_vectors
from mlpfuse.stages.math.kmeans import KMEANS_INITS, kmeans
from mlpfuse.stages.model.checkpoint import resolve_source
from mlpfuse.stages.model.families import FFBlockRef, family_for


def load_smollm2(cache: Path) -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32, from ``cache`` or (first run) the packaged GGUF."""
    from transformers import AutoModelForCausalLM

    if (cache / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    src = resolve_source("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(
        src.path, gguf_file=src.gguf_file, dtype=torch.float32
    )
    # The GGUF weights are de-quantised on load; drop the quantizer so the copy saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(cache)  # atomic: a half-written cache is never mistaken for a complete one
    return model


def inertia(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> float:
    d = x.astype(np.float64) - centroids.astype(np.float64)[assign]
    return float(np.einsum("nd,nd->", d, d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--k", type=int, default=384)
    ap.add_argument(
        "--iters", type=int, default=50, help="Lloyd iterations per restart (both libraries)"
    )
    ap.add_argument("--n-init", type=int, default=3, help="restarts for the like-for-like rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip scikit-learn at n_init=30")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/mlpfuse-bench/smollm2-135m-instruct"))
    args = ap.parse_args()

    from sklearn.cluster import KMeans

    args.cache.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_smollm2(args.cache)
    load_s = time.perf_counter() - t0
    adapter = family_for(model.config)
    layer = model.get_submodule(adapter.layers_path)[args.layer]
    ff = adapter.read_ff(model.config, layer.state_dict(), FFBlockRef("dense"))
    x = sub_mlp_vectors(ff)
    del model
    print(
        f"SmolLM2-135M-Instruct layer {args.layer}: {x.shape[0]} sub-MLPs x {x.shape[1]} dims"
        f" -> k={args.k} "
        f"(model load {load_s:.1f} s, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    )

    rows: list[tuple[str, float, float, str]] = []

    for init in KMEANS_INITS:
        t0 = time.perf_counter()
        res = kmeans(x, args.k, iters=args.iters, seed=args.seed, n_init=args.n_init, init=init)
        rows.append(
            (
                f"mlpfuse.stages.math.kmeans (faiss) init={init} n_init={args.n_init} iters={args.iters}",
                time.perf_counter() - t0,
                inertia(x, res.centroids, res.assign),
                f"{res.iters} iterations",
            )
        )

    configs = [
        (
            f"sklearn KMeans n_init={args.n_init} max_iter={args.iters}",
            {"n_init": args.n_init, "max_iter": args.iters, "tol": 0.0},
        )
    ]
    if not args.no_reference:
        configs.append(("sklearn KMeans n_init=30 (reference setting)", {"n_init": 30}))
    for name, kw in configs:
        t0 = time.perf_counter()
        km = KMeans(n_clusters=args.k, algorithm="lloyd", random_state=args.seed, **kw).fit(x)
        rows.append(
            (
                name,
                time.perf_counter() - t0,
                inertia(x, km.cluster_centers_, km.labels_),
                f"{km.n_iter_} iterations (best run)",
            )
        )

    base_t, base_i = rows[0][1], rows[0][2]
    print(f"{'method':<62} {'time s':>8} {'x first':>8} {'inertia':>10} {'/ first':>8}  note")
    for name, sec, inert, note in rows:
        print(
            f"{name:<62} {sec:8.2f} {sec / base_t:8.1f} {inert:10.2f} {inert / base_i:8.4f}  {note}"
        )


if __name__ == "__main__":
    main()
