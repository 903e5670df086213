"""Least-squares refit of a compressed FF block's down projection against the original's output.

After pruning or fusing, the input of the down projection ``H = ff_compressed.hidden(x)``
[n, k] has changed; the best output weights for it solve the ridge problem
``min_W ||H W^T + b - Y||^2 + lambda ||W||^2`` with ``Y`` [n, H_out] the *original* block's
output on the same tokens. Only ``H^T H`` and ``H^T Y`` are needed, so they are accumulated
chunk by chunk (tokens never need to be resident together), in float64 because ``H^T H`` sums
many products of similar magnitude and its conditioning decides the solve.

Tied windows (one parameter set shared by several layers) are fit jointly by updating one
accumulator with every layer's ``(H, Y)``, or by :meth:`RefitAccumulator.merge` of per-layer
accumulators filled in parallel: the statistics of a union of samples are the sums.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from mlpfuse.stages.math.ffweights import FFWeights


def self_product(c: Tensor) -> Tensor:
    """``cᵀc`` of a 2-D tensor. On the CPU (float32/float64) through NumPy, whose BLAS call for
    ``aᵀa`` is a symmetric rank-k update: half the multiplications of the general product torch
    makes of ``c.T @ c`` (1.9× faster at [2048, 1536] float32 on this machine)."""
    if c.device.type == "cpu" and c.dtype in (torch.float32, torch.float64) and not c.requires_grad:
        a = c.detach().contiguous().numpy()
        return torch.from_numpy(a.T @ a)
    return c.T @ c


class RefitAccumulator:
    """Streams ``H^T H`` [k(+1), k(+1)], ``H^T Y`` [k(+1), out] and ``sum ||Y||^2``.

    ``bias=True`` appends a ones column to ``H``, so the solve also fits an output bias.
    ``device``: where the statistics live and the products run (the activations' device avoids
    moving every chunk to the host; ``H^T H`` costs n k^2 per chunk).
    """

    def __init__(
        self, k_hidden: int, out_dim: int, bias: bool, device: torch.device | str = "cpu"
    ) -> None:
        if k_hidden < 1 or out_dim < 1:
            raise ValueError(f"k_hidden and out_dim must be >= 1, got {k_hidden}, {out_dim}")
        self.k_hidden, self.out_dim, self.bias = k_hidden, out_dim, bias
        m = k_hidden + int(bias)
        self.hth = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.hty = torch.zeros(m, out_dim, dtype=torch.float64, device=device)
        self.yty = 0.0
        self.n = 0

    def _augment(self, h: Tensor) -> Tensor:
        h = h.detach().to(self.hth.device)
        ones = torch.ones(len(h), 1, dtype=h.dtype, device=h.device)
        return torch.cat([h, ones], dim=1) if self.bias else h

    def update(self, h: Tensor, y: Tensor) -> None:
        """Add tokens: ``h`` [..., k] the compressed block's hidden, ``y`` [..., out] the original
        block's output for the same tokens (leading dimensions are flattened)."""
        h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1, y.shape[-1])
        if h.shape[1] != self.k_hidden or y.shape[1] != self.out_dim or len(h) != len(y):
            raise ValueError(
                f"expected H [n, {self.k_hidden}] and Y [n, {self.out_dim}] with the same n, "
                f"got {tuple(h.shape)} and {tuple(y.shape)}"
            )
        # Float32 inputs: products of float32 row chunks summed in float64 — float32 rounding
        # (relative ~1e-7) at a fraction of the cost of float64 matmuls. Float64 inputs stay exact.
        cdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        ha = self._augment(h).to(cdt)
        yf = y.detach().to(self.hth.device, cdt)
        for s in range(0, len(ha), 2048):
            hc, yc = ha[s : s + 2048], yf[s : s + 2048]
            self.hth += self_product(hc).double()
            self.hty += (hc.T @ yc).double()
        self.yty += float(yf.double().square().sum())
        self.n += len(h)

    @classmethod
    def from_gram(
        cls, gram: Tensor, hidden_sum: Tensor, n: int, kept: Tensor, down: Tensor,
        b_down: Tensor | None = None, bias: bool = False,
    ) -> RefitAccumulator:
        """The statistics of a *pruned* block, without its tokens: from the original block's
        ``gram`` = HᵀH [I, I] and ``hidden_sum`` = Σh [I] over ``n`` tokens (collect's
        ``hidden.gram``/``hidden.sum``), the ``kept`` neuron indices [k] and its original
        ``down`` [out, I] (and ``b_down``). The pruned block's hidden is H[:, kept] and the
        original output is ``Y = H Wᵀ + b``, so ``H_kᵀH_k = G[kept, kept]``,
        ``H_kᵀY = G[kept, :] Wᵀ + s_k bᵀ`` and ``‖Y‖² = tr(W G Wᵀ) + 2 bᵀW s + n‖b‖²``: the same
        sums :meth:`update` accumulates from the tokens, at O(k·I·out) instead of O(n·I·out)."""
        g = torch.as_tensor(gram, dtype=torch.float64)
        hs = torch.as_tensor(hidden_sum, dtype=torch.float64)
        w = down.detach().to(torch.float64)
        idx = torch.as_tensor(kept, dtype=torch.long)
        if g.shape != (w.shape[1], w.shape[1]) or hs.shape != (w.shape[1],):
            raise ValueError(f"gram {tuple(g.shape)} / sum {tuple(hs.shape)} do not match down {tuple(w.shape)}")
        acc = cls(len(idx), int(w.shape[0]), bias, device="cpu")
        g_k = g[idx]  # [k, I]
        wg = g @ w.T  # [I, out]: G Wᵀ
        acc.hth[: len(idx), : len(idx)] = g_k[:, idx]
        acc.hty[: len(idx)] = wg[idx]
        acc.yty = _sum(w.T * wg)
        b = None if b_down is None else b_down.detach().to(torch.float64)
        if b is not None:
            acc.hty[: len(idx)] += hs[idx, None] * b[None, :]
            acc.yty += 2.0 * float(b @ (w @ hs)) + n * float(b @ b)
        if bias:
            acc.hth[-1, : len(idx)] = acc.hth[: len(idx), -1] = hs[idx]
            acc.hth[-1, -1] = float(n)
            acc.hty[-1] = w @ hs + (n * b if b is not None else 0.0)
        acc.n = int(n)
        return acc

    def merge(self, other: RefitAccumulator) -> None:
        """Add another accumulator's statistics (same shapes) to this one."""
        if (other.k_hidden, other.out_dim, other.bias) != (self.k_hidden, self.out_dim, self.bias):
            raise ValueError(
                f"cannot merge accumulator (k={other.k_hidden}, out={other.out_dim}, "
                f"bias={other.bias}) "
                f"into (k={self.k_hidden}, out={self.out_dim}, bias={self.bias})"
            )
        self.hth += other.hth.to(self.hth.device)
        self.hty += other.hty.to(self.hth.device)
        self.yty += other.yty
        self.n += other.n

    def solve(self, lam: float) -> tuple[Tensor, Tensor | None]:
        """Ridge solution ``(W [out, k], b [out] or None)``, float64 on the accumulator's device.

        Solves ``(H^T H + lambda I) W^T = H^T Y`` with ``lambda = lam * mean(diag(H^T H))``: the
        ridge is relative to the mean per-neuron energy, so one ``lam`` means the same amount of
        shrinkage in every layer (hidden activations differ by orders of magnitude across layers
        and models) and does not change when statistics of several layers are summed. Scaling
        ``H`` by c scales ``W`` by 1/c exactly. The bias column is not regularised.
        """
        if self.n == 0:
            raise ValueError("no samples: call update() before solve()")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        k = self.k_hidden
        a = self.hth.clone()
        ridge = lam * float(a.diagonal()[:k].mean())
        a.diagonal()[:k] += ridge
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            del a  # [k, k] float64 each (0.13 GB at k = 4096): one of them at a time past here
            sol = torch.cholesky_solve(self.hty, chol)
            del chol
        else:
            # Singular without a ridge (dead neurons, fewer tokens than neurons): the minimum-norm
            # least-squares solution (gelsd, the SVD-based driver, exists on the CPU only).
            sol = torch.linalg.lstsq(a.cpu(), self.hty.cpu(), driver="gelsd").solution
            sol = sol.to(a.device)
        return sol[:k].T.contiguous(), (sol[k].clone() if self.bias else None)

    def sse(self, w: Tensor, b: Tensor | None = None) -> float:
        """Sum of squared errors ``||H W^T + b - Y||^2`` over every accumulated token, from the
        statistics alone (to compare weights before and after a refit without the data)."""
        dev = self.hth.device
        wa = w.detach().to(dev, torch.float64).T
        if self.bias:
            zero = torch.zeros(1, self.out_dim, dtype=torch.float64, device=dev)
            wa = torch.cat([wa, zero if b is None else b.detach().to(dev, torch.float64)[None]])
        return _sum(wa * (self.hth @ wa)) - 2 * _sum(wa * self.hty) + self.yty

    def select(self, kept: Tensor) -> RefitAccumulator:
        """The statistics of the same tokens with only hidden features ``kept`` [k] (a pruned
        block's, from the full block's): no product is recomputed."""
        idx = torch.as_tensor(kept, dtype=torch.long, device=self.hth.device)
        if self.bias:
            idx = torch.cat([idx, torch.tensor([self.k_hidden], device=idx.device)])
        out = RefitAccumulator(len(kept), self.out_dim, self.bias, device=self.hth.device)
        out.hth, out.hty = self.hth[idx][:, idx], self.hty[idx]
        out.yty, out.n = self.yty, self.n
        return out


def _sum(t: Tensor) -> float:
    """The sum of a statistic's terms in one fixed order (NumPy, one thread): torch's reductions
    split over however many threads the process has, so their last bits follow the worker."""
    return float(np.sum(t.detach().cpu().numpy()))


def refit_down(ff_compressed: FFWeights, acc: RefitAccumulator, lam: float) -> FFWeights:
    """``ff_compressed`` with ``down`` (and ``b_down``) replaced by the ridge solution of ``acc``.

    ``acc`` must have been filled with ``H = ff_compressed.hidden(x)`` and the original block's
    output ``Y``, and fit a bias exactly when the block has one (a bias-free architecture has
    nowhere to store a fitted bias; a block with a bias whose bias was not fitted would need Y
    shifted by it, which is easy to get wrong).
    """
    k, h = ff_compressed.intermediate_size, ff_compressed.hidden_size
    if (acc.k_hidden, acc.out_dim) != (k, h):
        raise ValueError(
            f"accumulator is for k={acc.k_hidden}, out={acc.out_dim}; block has k={k}, hidden={h}"
        )
    has_bias = ff_compressed.b_down is not None
    if acc.bias != has_bias:
        raise ValueError(
            f"accumulator bias={acc.bias} but the block {'has' if has_bias else 'has no'} b_down; "
            f"build RefitAccumulator(..., bias={has_bias})"
        )
    w, b = acc.solve(lam)
    like = ff_compressed.down
    return replace(
        ff_compressed,
        down=w.to(like.device, like.dtype),
        b_down=None if b is None else b.to(like.device, like.dtype),
    )
