"""Linear CKA (Kornblith et al., 2019): how alike two layers' representations of the same tokens are.

``CKA(X, Y) = <Kx, Ky>_F / (‖Kx‖_F ‖Ky‖_F)`` with the centred sample Gram ``K = Xc Xcᵀ`` [n, n];
1 for identical representations, invariant to orthogonal transforms and isotropic scaling, 0 for a
constant one. The heat-map of L layers normalises each layer's Gram once (:func:`normalized_gram`)
and takes every pair as one inner product (:func:`gram_products`), so L layers cost L·n²·d + L²·n²
instead of L²·n·d²; :func:`cka` is the same quantity for one pair, in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Columns of the stacked Grams summed per step in :func:`gram_products` (bounds the float64 copy).
_DOT_CHUNK = 1 << 18


def normalized_gram(f: np.ndarray | Tensor) -> tuple[Tensor, bool]:
    """Centred sample Gram ``Fc Fcᵀ`` [n, n] of ``f`` [n, d] divided by its Frobenius norm
    (float64), and whether it is nonzero (a constant representation has a zero Gram)."""
    t = torch.as_tensor(np.ascontiguousarray(f) if isinstance(f, np.ndarray) else f).to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"features must be a 2-D matrix [rows, features], got shape {tuple(t.shape)}")
    tc = t - t.mean(0)
    g = tc @ tc.T
    norm = float(g.norm())
    return (g / norm if norm > 0 else g), norm > 0


def gram_products(grams: Tensor) -> np.ndarray:
    """``grams`` [L, n²] (flattened normalised Grams, any float dtype) -> ``grams @ grams.T``
    [L, L]: the pairwise CKA matrix, summed in float64 chunk by chunk."""
    out = torch.zeros(grams.shape[0], grams.shape[0], dtype=torch.float64)
    for s in range(0, grams.shape[1], _DOT_CHUNK):
        c = grams[:, s : s + _DOT_CHUNK].double()
        out += c @ c.T
    return out.numpy()


def cka(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Linear CKA of two feature matrices ``x`` [n, d_x] and ``y`` [n, d_y] on the same rows."""
    if len(x) != len(y):
        raise ValueError(f"CKA compares representations of the same rows, got {len(x)} and {len(y)} rows")
    if len(x) < 2:
        raise ValueError(f"CKA needs at least 2 rows, got {len(x)}")
    (kx, _), (ky, _) = normalized_gram(x), normalized_gram(y)
    return float((kx * ky).sum())
