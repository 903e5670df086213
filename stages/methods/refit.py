"""The refit applied after any method that removes or fuses neurons."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.refit import RefitAccumulator, refit_down
from mlpfuse.stages.methods.base import BuildContext
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.overlay import Overlay


class RefitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Relative ridge: λ = lam · mean(diag(HᵀH)), so one value means the same shrinkage everywhere.
    lam: float = Field(1e-3, ge=0)
    rows: int = Field(4096, ge=16)
    # Fit each layer on the compressed model's own FF inputs (every earlier layer already
    # compressed and refit) instead of the original model's, against the original layer's output
    # on the original inputs, so each fit also absorbs the drift of the layers before it. Needs
    # the calibration tokens (the data artifact); not for tied windows (their layers' inputs
    # depend on the shared weights being fit). MoE experts keep the original routing's tokens.
    sequential: bool = False


def refit_overlay(ov: Overlay, ctx: BuildContext, cfg: RefitConfig, data_dir: Path | None = None) -> dict[str, list[float]]:
    """Re-solve the down projection of every changed block; returns per-layer relative errors
    (of the block's output against the original block's on the original inputs)."""
    groups = [g for g in ov.tied] + [[i] for i in ov.blocks if not any(i in g for g in ov.tied)]
    before: dict[int, float] = {}
    after: dict[int, float] = {}

    def solved(stored: FFWeights, new: FFWeights, acc: RefitAccumulator) -> FFWeights:
        """The refit block, kept (and its error measured) in the precision it is written in."""
        fit = refit_down(new, acc, cfg.lam)
        dtype = stored.down.dtype
        return replace(stored, down=fit.down.to(dtype), b_down=None if fit.b_down is None else fit.b_down.to(dtype))

    def fit_group(group: list[int], own_inputs: dict[int, Tensor] | None = None) -> None:
        for ref in list(ov.blocks[group[0]]):
            stored = ov.blocks[group[0]][ref]
            if stored.intermediate_size == 0:
                continue
            new = stored.to(torch.float32)
            acc = None if own_inputs is not None else _gram_statistics(ctx, group, ref, new)
            if acc is not None:  # kept neurons of the original: solved from collect's HᵀH, no tokens read
                i = group[0]
                norm = acc.yty or 1.0
                kept = solved(stored, new, acc)
                before[i] = before.get(i, 0.0) + acc.sse(new.down, new.b_down) / norm
                after[i] = after.get(i, 0.0) + acc.sse(kept.down, kept.b_down) / norm
                ov.blocks[i][ref] = kept
                continue
            acc = RefitAccumulator(new.intermediate_size, new.hidden_size, bias=new.b_down is not None)
            # The original blocks are upcast one at a time, and not held while the solve runs.
            norms: dict[int, float] = {}
            errs: dict[int, float] = {}
            inputs: dict[int, Tensor] = {}
            for i in group:
                src = ov.sources.get(i, {}).get(ref, ref)  # the original block it stands for
                orig = ctx.block(i, src)
                x = ctx.block_inputs(i, src)
                if not len(x):  # an expert no calibration token was routed to
                    continue
                h_in = x if own_inputs is None else ctx.rows_of(i, src, own_inputs[i])
                norms[i] = errs[i] = 0.0
                inputs[i] = x
                for s in range(0, x.shape[0], cfg.rows):
                    with torch.no_grad():
                        y, h = orig.forward(x[s : s + cfg.rows]), new.hidden(h_in[s : s + cfg.rows])
                        acc.update(h, y)
                        norms[i] += float((y * y).sum())
                        errs[i] += float(((new.forward(x[s : s + cfg.rows]) - y) ** 2).sum())
                del orig, h_in
            if acc.n == 0:  # nothing to fit: the block stays as it is
                continue
            kept = solved(stored, new, acc)
            del acc, new
            fitted = kept.to(torch.float32)
            for i, x in inputs.items():
                orig = ctx.block(i, ov.sources.get(i, {}).get(ref, ref))
                err = 0.0
                for s in range(0, x.shape[0], cfg.rows):
                    with torch.no_grad():
                        err += float(((fitted.forward(x[s : s + cfg.rows]) - orig.forward(x[s : s + cfg.rows])) ** 2).sum())
                before[i] = before.get(i, 0.0) + errs[i] / (norms[i] or 1.0)
                after[i] = after.get(i, 0.0) + err / (norms[i] or 1.0)
                del orig
            del fitted, inputs
            for i in group:
                ov.blocks[i][ref] = kept

    if not cfg.sequential:
        for group in groups:
            fit_group(group)
    else:
        if ov.tied:
            raise InputError("sequential refit does not apply to tied windows (their layers' inputs depend on the "
                             "shared weights being fit); use refit: {sequential: false}")
        if data_dir is None:
            raise InputError("sequential refit needs the calibration tokens: add the data stage's output")
        for i, x_own in _compressed_inputs(ov, ctx, data_dir):
            fit_group([i], {i: x_own})
    layers: list[Any] = sorted(before)
    return {"layers": layers, "before": [before[i] for i in layers], "after": [after[i] for i in layers]}


def _gram_statistics(ctx: BuildContext, group: list[int], ref: FFBlockRef, new: FFWeights) -> RefitAccumulator | None:
    """The refit statistics of a block that keeps a subset of the original's neurons unchanged
    (pruned, MLPMoE) from collect's HᵀH of the original block, where that exists (``gram_max`` at
    least the block's width) and the block is one layer's own."""
    key = f"L{group[0]:05d}/{ref.name}"
    if len(group) != 1 or key not in ctx.kept or ctx.collect_dir is None:
        return None
    stats = ctx.stats(group[0], "refit").get(ref.name, {})
    if "hidden.gram" not in stats or not int(stats["count"][0]):
        return None
    orig = ctx.stored(group[0], ref)
    return RefitAccumulator.from_gram(
        torch.from_numpy(stats["hidden.gram"]), torch.from_numpy(stats["hidden.sum"]), int(stats["count"][0]),
        ctx.kept[key], orig.down, orig.b_down, bias=new.b_down is not None)


def _compressed_inputs(ov: Overlay, ctx: BuildContext, data_dir: Path) -> Iterator[tuple[int, Tensor]]:
    """Walk the calibration blocks through the compressed model one layer at a time, yielding
    (layer, the FF input x of every calibration token [n_tokens, H]) for each changed layer
    *before* it is applied; the caller refits it in ``ov`` and the walk then applies the result."""
    from mlpfuse.stages.data import read_calib
    from mlpfuse.stages.model.overlay import ff_patch

    model, family = ctx.model, ctx.family
    calib = read_calib(data_dir)
    states = [model.start(torch.from_numpy(calib[b : b + 4])) for b in range(0, len(calib), 4)]

    class _Stop(Exception):
        pass

    for i in range(ctx.num_layers):
        if i in ov.skip:
            continue
        base = model.layer_state(i)
        if i in ov.blocks:
            xs: list[Tensor] = []

            def grab(_m: torch.nn.Module, args: tuple, xs: list[Tensor] = xs) -> None:
                xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
                raise _Stop

            with model.layer(i, base) as layer:
                handle = layer.get_submodule(family.ff_module).register_forward_pre_hook(grab)
                try:
                    for s in states:
                        try:
                            model.apply(layer, i, s)
                        except _Stop:
                            pass
                finally:
                    handle.remove()
            yield i, torch.cat(xs)
            base = {**base, **ff_patch(family, ctx.config, base, ov.blocks[i])}
        with model.layer(i, base) as layer:
            for s in states:
                s.hidden = model.apply(layer, i, s)

