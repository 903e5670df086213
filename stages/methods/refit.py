"""The refit applied after any method that removes or fuses neurons."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

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
    # down: the down projection (and bias) re-solved in closed form (the ridge), cheap. block:
    # then every weight of the block fitted to the original block's output from the ridge's
    # solution: gate, up (and their bias) by Adam, the down projection re-solved in closed form for
    # them at each checkpoint (stages/math/blockfit.py); the last ``holdout`` of the block's
    # calibration tokens are held back, and the better of the start and the fit on them is kept.
    # Reads the FF inputs (collect's, or the compressed model's own when sequential).
    mode: Literal["down", "block"] = "down"
    steps: int = Field(300, ge=0)  # block: Adam steps per block
    lr: float = Field(3e-4, gt=0)  # block: peak learning rate of the features (cosine decay to 0)
    batch: int = Field(1024, ge=1)  # block: calibration rows per step
    holdout: float = Field(0.1, ge=0, lt=1)  # block: the rows held back to keep the better
    # block: a wall-clock limit per block (None: the steps alone decide; with a limit the result
    # depends on the machine's speed, and so does the cached artifact's content).
    seconds: float | None = Field(None, gt=0)
    seed: int = 0


def refit_overlay(ov: Overlay, ctx: BuildContext, cfg: RefitConfig, data_dir: Path | None = None) -> dict[str, list[float]]:
    """Re-solve the down projection of every changed block (``mode: block``: then fit the whole
    block from there); returns per-layer relative errors (of the block's output against the
    original block's on the original inputs) before and after."""
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
            gram = None if own_inputs is not None else _gram_statistics(ctx, group, ref, new)
            if gram is not None and cfg.mode == "down":  # kept neurons of the original: solved from
                acc = gram  # collect's HᵀH, no tokens read
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
            pairs: list[tuple[Tensor, Tensor]] = []  # block mode: (the block's input, target) per layer
            for i in group:
                src = ov.sources.get(i, {}).get(ref, ref)  # the original block it stands for
                orig = ctx.block(i, src)
                x = ctx.block_inputs(i, src)
                if not len(x):  # an expert no calibration token was routed to
                    continue
                h_in = x if own_inputs is None else ctx.rows_of(i, src, own_inputs[i])
                norms[i] = errs[i] = 0.0
                inputs[i] = x
                ys = []
                for s in range(0, x.shape[0], cfg.rows):
                    with torch.no_grad():
                        y, h = orig.forward(x[s : s + cfg.rows]), new.hidden(h_in[s : s + cfg.rows])
                        acc.update(h, y)
                        norms[i] += float((y * y).sum())
                        errs[i] += float(((new.forward(x[s : s + cfg.rows]) - y) ** 2).sum())
                        if cfg.mode == "block":
                            ys.append(y)
                if ys:
                    pairs.append((h_in, torch.cat(ys)))
                del orig, h_in, ys
            if acc.n == 0:  # nothing to fit: the block stays as it is
                continue
            # The block mode starts from the down mode's solution (from HᵀH where that exists).
            kept = solved(stored, new, gram if gram is not None else acc)
            del acc, new, gram
            if pairs:
                kept = _fit_whole_block(kept, pairs, cfg)
            del pairs
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


def _fit_whole_block(start: FFWeights, pairs: list[tuple[Tensor, Tensor]], cfg: RefitConfig) -> FFWeights:
    """``refit: {mode: block}``: every weight of ``start`` fitted to the original block's output on
    ``pairs`` (each layer's inputs and targets: one pair, or one per layer of a tied window), on the
    device the stage task holds. The rows held back to keep the better are the last ``holdout`` of
    each layer's tokens."""
    from mlpfuse.core.compute import current_compute
    from mlpfuse.stages.math.blockfit import fit_block

    dev = current_compute().torch_device
    cut = [len(x) - int(round(cfg.holdout * len(x))) for x, _ in pairs]
    x = torch.cat([x[:c] for (x, _), c in zip(pairs, cut, strict=True)] + [x[c:] for (x, _), c in zip(pairs, cut, strict=True)])
    y = torch.cat([y[:c] for (_, y), c in zip(pairs, cut, strict=True)] + [y[c:] for (_, y), c in zip(pairs, cut, strict=True)])
    held = sum(len(p[0]) - c for p, c in zip(pairs, cut, strict=True))
    fitted, _ = fit_block(start, x.to(dev), y.to(dev), steps=cfg.steps, lr=cfg.lr, batch=cfg.batch, held=held,
                          lam=cfg.lam, seconds=cfg.seconds, seed=cfg.seed)
    return fitted  # in start's dtype and on its device


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

