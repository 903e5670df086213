"""Per-layer error measures of a compressed FF block against the original: the relative output
error, and the closed-form empirical NTK of a block's projected output w.r.t. all its parameters
(the kernel MLP Fusion preserves), with its sign variant. Float64 throughout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mlpfuse.stages.math.ffweights import FFWeights


# ----- kernels ------------------------------------------------------------------------------------
@dataclass
class Kernels:
    ntk: Tensor  # J Jᵀ [n, n]
    sign: Tensor  # J sign(J)ᵀ [n, n] (asymmetric)

    def __add__(self, o: Kernels) -> Kernels:
        return Kernels(self.ntk + o.ntk, self.sign + o.sign)

    def weighted(self, c: Tensor) -> Kernels:
        """The kernels of the block scaled per token by ``c`` [n] (a routing weight)."""
        return Kernels(self.ntk * c[:, None] * c[None, :], self.sign * c[:, None] * torch.sign(c)[None, :])


def _act_and_grad(act: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """act(z) and act'(z) (elementwise activation; derivative by autograd)."""
    from transformers.activations import ACT2FN

    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        a = ACT2FN[act](z)
        (d,) = torch.autograd.grad(a.sum(), z)
    return a.detach(), d.detach()


def _sdot(a: Tensor, b: Tensor) -> Tensor:
    """[n, d] x [n, d] -> [n, n]: a_t · sign(b_s)."""
    return a @ torch.sign(b).T


def ff_kernels(ff: FFWeights, x: Tensor, r: Tensor, scale: Tensor | None = None) -> Kernels:
    """Closed-form kernels of ``s_t = ⟨r, FF(x_t)⟩`` w.r.t. all of ``ff``'s parameters.

    ``ff`` is the folded block (what the model computes); ``scale`` [I] (P) gives the training
    form ``down_c = down / P`` applied as ``down_c (P ⊙ h)``: only the ``down`` part changes.
    """
    dt = torch.float64
    ff = ff.to(dt)
    x, r = x.to(dt), r.to(dt)
    p = torch.ones(ff.intermediate_size, dtype=dt) if scale is None else scale.to(dt)
    xx, xs = x @ x.T, _sdot(x, x)
    rho = ff.down.T @ r  # [I]: the signal back into h (= P ⊙ down_cᵀ r in the training form)
    u = torch.nn.functional.linear(x, ff.up, ff.b_up)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []  # (a [n, I], xx-like, xs-like): J = a ⊗ x
    if ff.gate is not None:
        ag, dg = _act_and_grad(ff.act, torch.nn.functional.linear(x, ff.gate))
        h = ag * u
        a_up, a_gate = rho * ag, rho * u * dg
        parts.append((a_up, xx, xs))
        parts.append((a_gate, xx, xs))
        if ff.b_up is not None:
            parts.append((a_up, torch.ones_like(xx), torch.ones_like(xs)))
    else:
        h, du = _act_and_grad(ff.act, u)
        a = rho * du
        parts.append((a, xx, xs))
        if ff.b_up is not None:
            parts.append((a, torch.ones_like(xx), torch.ones_like(xs)))
    ph = h * p  # ∂s/∂down_c = r (P ⊙ h)ᵀ
    ntk = (ph @ ph.T) * (r @ r)
    sign = _sdot(ph, ph) * r.abs().sum()
    if ff.b_down is not None:
        ntk = ntk + r @ r
        sign = sign + r.abs().sum()
    for a, g, gs in parts:
        ntk = ntk + (a @ a.T) * g
        sign = sign + _sdot(a, a) * gs
    return Kernels(ntk, sign)


def rel_error(new: Tensor, ref: Tensor) -> float:
    den = float(torch.linalg.norm(ref))
    num = float(torch.linalg.norm(new - ref))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den

