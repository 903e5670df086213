"""Whole-block refit: every weight of a compressed FF block (gate, up and down, or in and out for
non-GLU MLPs, biases included) fitted together to the original block's output.

The down-only ridge (:mod:`refit`) is optimal for the down projection *given* the kept hidden
features; fitting the features too can lower the error further. That is non-convex in the
features' weights, so they are moved by Adam from the ridge's solution, on the block's
calibration inputs, in a fixed number of steps (or seconds), with the down projection re-solved in
closed form for them at each checkpoint (alternating: each part optimal or descending given the
other). The last rows (``held`` of them) are never trained on:
the starting point (its down projection solved on the other rows alone, like the checkpoints') and
every checkpoint are scored on it, the best is kept and its down projection solved again on every
row, so the fit never returns features that did worse than the start's on tokens they did not see.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from mlpfuse.stages.math.ffweights import FFWeights

_FIELDS = ("up", "gate", "b_up", "down", "b_down")


@dataclass(frozen=True)
class BlockFit:
    """What :func:`fit_block` did: the relative error ‖f(x) − y‖² / ‖y‖² on the held-back rows of
    the start and of the kept block, the steps run and whether the fitted weights were kept."""

    start_error: float
    error: float
    steps: int
    kept_fit: bool


def _sse(ff: FFWeights, x: Tensor, y: Tensor, rows: int = 4096) -> float:
    err = 0.0
    with torch.no_grad():
        for s in range(0, len(x), rows):
            err += float(((ff.forward(x[s : s + rows]) - y[s : s + rows]) ** 2).sum())
    return err


def _as_written(f32: FFWeights, params: dict[str, Any], start: FFWeights) -> FFWeights:
    """The fitted block as it will be stored (rounded to ``start``'s dtype), in float32."""
    cast: dict[str, Any] = {k: None if v is None else v.to(getattr(start, k).dtype).float() for k, v in params.items()}
    return replace(f32, **cast)


def fit_block(start: FFWeights, x: Tensor, y: Tensor, *, steps: int, lr: float, batch: int,
              held: int, lam: float, seconds: float | None = None, seed: int = 0) -> tuple[FFWeights, BlockFit]:
    """Fit ``start``'s weights to ``y`` [n, H] on inputs ``x`` [n, H] (float32, on ``x``'s device):
    Adam on the features' weights (gate, up and their bias) in mini-batches of ``batch`` rows of
    all rows but the last ``held``, the learning rate decaying on a cosine to zero over
    ``steps``, and every ``steps // 8`` steps (and at the end) the down projection (and its bias)
    re-solved in closed form for the current features (the ridge, ``lam`` relative as the refit's)
    on the same rows. Adam on the down projection itself would move it off the optimum it starts
    at by its step size, whatever the gradient; the closed form keeps it optimal for the features
    at every checkpoint. Each checkpoint is scored on the held-back rows, as it will be stored (in
    ``start``'s dtype); the best of the start and the checkpoints is returned. ``seconds`` stops
    the fit early (the result then depends on the machine's speed)."""
    from mlpfuse.stages.math.refit import RefitAccumulator

    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, y {y.shape[0]}")
    n_val = min(max(held, 0), len(x) - 1) if len(x) > 1 else 0
    n_fit = len(x) - n_val
    dev = x.device
    x32, y32 = x.float(), y.float().to(dev)
    x_fit, y_fit = x32[:n_fit], y32[:n_fit]
    x_val, y_val = (x32[n_fit:], y32[n_fit:]) if n_val else (x_fit, y_fit)
    norm = float((y_val.double() ** 2).sum()) or 1.0
    f32 = start.to(torch.float32)
    f32 = replace(f32, **{k: getattr(f32, k).to(dev) for k in _FIELDS if getattr(f32, k) is not None})
    if steps == 0 or n_fit == 0 or n_val == 0:
        err = _sse(f32, x_val, y_val) / norm
        return start, BlockFit(err, err, 0, False)

    def resolve(features: dict[str, Any], rows: int) -> dict[str, Any]:
        """The down projection (and bias) solved for ``features`` on the first ``rows`` rows."""
        with torch.no_grad():
            cur = replace(f32, **features)
            acc = RefitAccumulator(cur.intermediate_size, cur.hidden_size, bias=cur.b_down is not None, device=dev)
            for s in range(0, rows, 4096):
                acc.update(cur.hidden(x32[s : min(s + 4096, rows)]), y32[s : min(s + 4096, rows)])
            w, b = acc.solve(lam)
        return {"down": w.float(), "b_down": None if b is None else b.float()}

    # The start's own features with the down projection solved on the fitted rows alone: the fit's
    # checkpoints are compared with it on the held-back rows like for like (the start itself was
    # solved on every row, held-back ones included, so its error there is optimistic).
    feats0: dict[str, Any] = {k: getattr(f32, k) for k in ("up", "gate", "b_up") if getattr(f32, k) is not None}
    start_err = best_err = _sse(_as_written(f32, {**feats0, **resolve(feats0, n_fit)}, start), x_val, y_val) / norm

    feats = {k: v.detach().clone().requires_grad_(True) for k, v in feats0.items()}
    out: dict[str, Any] = {"down": f32.down, "b_down": f32.b_down}
    opt = torch.optim.Adam(feats.values(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1.0 / max(float((y_fit.double() ** 2).sum()) / n_fit, 1e-30)  # loss ~ relative error per row
    best: dict[str, Any] | None = None
    check = max(1, steps // 8)
    t0 = time.monotonic()
    done = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n_fit, (min(batch, n_fit),), generator=gen).to(dev)
        cur = replace(f32, **feats, **out)
        loss = ((cur.forward(x_fit[idx]) - y_fit[idx]) ** 2).sum(-1).mean() * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        out_of_time = seconds is not None and time.monotonic() - t0 > seconds
        if done % check == 0 or done == steps or out_of_time:
            out = resolve({k: v.detach() for k, v in feats.items()}, n_fit)
            fitted: dict[str, Any] = {**{k: v.detach() for k, v in feats.items()}, **out}
            with torch.no_grad():
                err = _sse(_as_written(f32, fitted, start), x_val, y_val) / norm
            if err < best_err:
                best_err, best = err, {k: v.clone() for k, v in fitted.items() if k in feats}
        if out_of_time:
            break
    if best is None:
        return start, BlockFit(start_err, start_err, done, False)
    # The kept features' down projection solved again on every row, as the start's was.
    final = {**best, **resolve(best, len(x32))}
    stored: dict[str, Any] = {k: None if v is None else v.to(getattr(start, k).device, getattr(start, k).dtype)
                              for k, v in final.items()}
    fitted_ff = replace(start, **stored)
    return fitted_ff, BlockFit(start_err, best_err, done, True)
