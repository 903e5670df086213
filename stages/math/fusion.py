"""MLP Fusion (Ai et al., arXiv 2307.08941): cluster an FF block's neurons into k centroids.

Each intermediate neuron i is a *sub-MLP*: its input row(s), its input bias and its output column.
k-means over these vectors gives k centroid sub-MLPs and cluster sizes ``P`` [k]. The fused block
computes ``y = down' (P * act(up' x + b')) + b_down`` (GLU: ``down' (P * act(gate' x) * (up' x +
b'))``): a centroid stands in for every member of its cluster, so its contribution is counted
``P_c`` times. With ``P`` kept as a fixed buffer, the gradient of each centroid is ``P_c`` times
the gradient its members would have had; the paper argues this is what keeps the network's
(Adam) NTK close to the original's, and for a block made of exact duplicates it makes one Adam
step of the fused block identical to one of the original (tested).

Two forms of a fused block: :class:`FusedMLP`, for fine-tuning, keeps ``P`` separate; for export
:meth:`FusedFF.fold` multiplies ``P`` into the columns of ``down``, leaving a plain MLP with
intermediate size k.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.kmeans import KMeansInit, check_weights, kmeans, weighted_means

FuseMode = Literal["fusion", "cluster"]
FUSE_MODES: tuple[FuseMode, ...] = ("fusion", "cluster")


def sub_mlp_vectors(ff: FFWeights, scale: np.ndarray | None = None) -> np.ndarray:
    """The sub-MLP of every neuron as one row: ``cat(up[i], gate[i], b_up[i], down[:, i])``
    (gate only for GLU blocks, b_up only when the block has one), times ``scale[i]`` when given.

    Returns [I, d] with d = H * (3 if GLU else 2) + (1 if b_up else 0), float32 (what faiss
    takes, and exact for bf16/fp16/fp32 weights) or float64 for a float64 block.
    """
    parts = [ff.up]
    if ff.gate is not None:
        parts.append(ff.gate)
    if ff.b_up is not None:
        parts.append(ff.b_up[:, None])
    parts.append(ff.down.t())
    dtype = torch.promote_types(ff.up.dtype, torch.float32)
    v = torch.cat([p.detach().to("cpu", dtype) for p in parts], dim=1).numpy()
    if scale is not None:
        s = np.asarray(scale, dtype=v.dtype)
        if s.shape != (ff.intermediate_size,):
            raise ValueError(f"scale must have shape [I] = [{ff.intermediate_size}], got {s.shape}")
        v = v * s[:, None]
    return v


def ff_from_sub_mlp_vectors(vectors: np.ndarray | Tensor, like: FFWeights) -> FFWeights:
    """Inverse of :func:`sub_mlp_vectors`: rows [k, d] -> an FF block with k neurons laid out like
    ``like`` (same parts, activation, ``b_down``, dtype and device)."""
    v = torch.as_tensor(vectors).to(like.up.device, like.up.dtype)
    h = like.hidden_size
    up, rest = v[:, :h], v[:, h:]
    gate = None
    if like.gate is not None:
        gate, rest = rest[:, :h], rest[:, h:]
    b_up = None
    if like.b_up is not None:
        b_up, rest = rest[:, 0], rest[:, 1:]
    if rest.shape[1] != h:
        raise ValueError(
            f"sub-MLP vectors of width {v.shape[1]} do not match the block's layout "
            f"(hidden size {h})"
        )
    return replace(
        like,
        up=up.contiguous(),
        gate=None if gate is None else gate.contiguous(),
        b_up=None if b_up is None else b_up.contiguous(),
        down=rest.t().contiguous(),
    )


@dataclass
class FusedFF:
    """A fused FF block.

    ``ff``: the trainable weights with k neurons (the centroids; in "cluster" mode with sqrt(P)
    already folded in). ``counts`` [k] float32: cluster sizes P. ``assign`` [I] int64: the
    cluster of each original neuron. ``inertia``: the k-means objective in the clustered space.
    """

    ff: FFWeights
    counts: Tensor
    assign: Tensor
    mode: FuseMode
    inertia: float

    @property
    def scale(self) -> Tensor:
        """Per-neuron factor [k] applied after the activation: P for "fusion", ones for "cluster"
        (whose sqrt(P) factors live in the weights)."""
        return self.counts if self.mode == "fusion" else torch.ones_like(self.counts)

    def fold(self) -> FFWeights:
        """The export form: ``scale`` multiplied into the columns of ``down`` (a plain MLP with
        intermediate size k that computes the same function)."""
        return replace(self.ff, down=self.ff.down * self.scale.to(self.ff.down)[None, :])

    def forward(self, x: Tensor) -> Tensor:
        """The fused block's output for ``x`` [..., H] -> [..., H]."""
        return self.fold().forward(x)


def fuse_ff(
    ff: FFWeights,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    n_init: int = 1,
    weights: np.ndarray | None = None,
    scale_by_sqrt_energy: np.ndarray | None = None,
    mode: FuseMode = "fusion",
    init: KMeansInit = "kmeans++",
    gpu: bool | None = None,
) -> FusedFF:
    """Cluster the I neurons of ``ff`` into ``k`` centroids.

    ``mode``:

    - ``"fusion"``: MLP Fusion as published; centroids plus a fixed count vector P applied after
      the activation (:attr:`FusedFF.scale`).
    - ``"cluster"``: the paper's plain clustering baseline, as in the authors' reference code
      (``update_cluster`` in ``models/roberta/modeling_roberta.py``): the same k-means, then
      sqrt(P) folded into both sides and no separate P, ``W1' = sqrt(P) W1_c``, ``b1' = sqrt(P)
      b1_c``, ``W2' = W2_c sqrt(P)``. For positively homogeneous activations (ReLU) its output
      equals "fusion"'s; it differs in the activation's curvature elsewhere and, being
      parameterised differently, in its training dynamics. For GLU blocks sqrt(P) goes into the
      ``gate`` rows (the pre-activation input, where the paper puts it) and ``down``; ``up`` and
      ``b_up`` stay the centroids', which keeps the ReLU-equality above.

    Data-aware variants (both [I], both optional, may be combined):

    - ``weights``: per-neuron k-means weights, e.g. the activation energy E[h_i^2]; the
      objective and the centroids become weighted.
    - ``scale_by_sqrt_energy``: per-neuron energy E[h_i^2]; each sub-MLP vector is multiplied by
      s_i = sqrt(E[h_i^2]) before clustering, so distance is measured where the neuron matters
      (neurons that rarely fire collapse towards the origin and share clusters). Centroids are
      then un-scaled: centroid_c = sum_{i in c} s_i v_i / sum_{i in c} s_i, the scaled-space mean
      divided by the cluster's mean scale, i.e. the s-weighted mean of the raw vectors.

    ``counts`` P are always the plain number of neurons per cluster: a centroid replaces that
    many neurons however they were weighted. ``iters``, ``seed``, ``n_init``, ``init`` and
    ``gpu`` go to :func:`mlpfuse.stages.math.kmeans.kmeans`.
    """
    n = ff.intermediate_size
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, I] = [1, {n}] for a block with {n} neurons, got k={k}")
    if mode not in FUSE_MODES:
        raise ValueError(f"mode must be one of {FUSE_MODES}, got {mode!r}")
    w = check_weights(weights, n, "weights")
    s = (
        None
        if scale_by_sqrt_energy is None
        else np.sqrt(check_weights(scale_by_sqrt_energy, n, "scale_by_sqrt_energy"))
    )
    raw = sub_mlp_vectors(ff)
    res = kmeans(
        raw if s is None else raw * s[:, None],
        k,
        iters=iters,
        seed=seed,
        weights=w,
        n_init=n_init,
        init=init,
        gpu=gpu,
    )
    # Centroids in the raw space, from the final assignment; without scaling this is k-means's own
    # (weighted) mean, recomputed from the block's weights in float64 so that a singleton cluster
    # reproduces its neuron exactly.
    coef = w if s is None else w * s
    centroids = ff_from_sub_mlp_vectors(weighted_means(raw, res.assign, coef, k), ff)
    counts = torch.from_numpy(np.bincount(res.assign, minlength=k).astype(np.float32))
    if mode == "cluster":
        r = counts.sqrt().to(centroids.up)
        if centroids.gate is not None:
            centroids = replace(centroids, gate=centroids.gate * r[:, None])
        else:
            centroids = replace(
                centroids,
                up=centroids.up * r[:, None],
                b_up=None if centroids.b_up is None else centroids.b_up * r,
            )
        centroids = replace(centroids, down=centroids.down * r[None, :])
    return FusedFF(centroids, counts, torch.from_numpy(res.assign), mode, res.inertia)


class FusedMLP(nn.Module):
    """The fine-tuning form of a fused block: centroid weights as trainable parameters, the
    per-neuron factor (P in "fusion" mode) as a non-trainable buffer applied after the
    activation. ``forward`` maps [..., H] -> [..., H].

    Parameters ``up`` [k, H], ``gate`` [k, H] or None, ``b_up`` [k] or None, ``down`` [H, k],
    ``b_down`` [H] or None; buffer ``scale`` [k].
    """

    up: nn.Parameter
    down: nn.Parameter
    gate: nn.Parameter | None
    b_up: nn.Parameter | None
    b_down: nn.Parameter | None
    scale: Tensor

    def __init__(self, ff: FFWeights, scale: Tensor | None = None) -> None:
        super().__init__()
        self.act = ff.act
        for name in ("up", "gate", "b_up", "down", "b_down"):
            t = getattr(ff, name)
            self.register_parameter(name, None if t is None else nn.Parameter(t.detach().clone()))
        k = ff.intermediate_size
        p = torch.ones(k) if scale is None else scale.detach().clone()
        if p.shape != (k,):
            raise ValueError(f"scale must have shape [k] = [{k}], got {tuple(p.shape)}")
        self.register_buffer("scale", p.to(ff.up))

    @classmethod
    def from_fused(cls, fused: FusedFF) -> FusedMLP:
        return cls(fused.ff, fused.scale)

    def _weights(self) -> FFWeights:
        return FFWeights(
            up=self.up,
            down=self.down,
            act=self.act,
            gate=self.gate,
            b_up=self.b_up,
            b_down=self.b_down,
        )

    def forward(self, x: Tensor) -> Tensor:
        ff = self._weights()
        return nn.functional.linear(ff.hidden(x) * self.scale, ff.down, ff.b_down)

    @torch.no_grad()
    def to_ff(self) -> FFWeights:
        """A detached copy of the current weights, the scale folded into ``down`` (export form)."""

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return FFWeights(
            up=self.up.clone(),
            down=self.down * self.scale,
            act=self.act,
            gate=copy(self.gate),
            b_up=copy(self.b_up),
            b_down=copy(self.b_down),
        )
