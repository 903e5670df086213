"""The depth baselines: ``layer_drop`` removes whole decoder layers, ``ff_drop`` removes the FF
sublayer of chosen layers (their residual path stays).

``layer_drop`` with ``linear_map: true`` is ReplaceMe (NeurIPS 2025): each run of contiguous
dropped layers a..b is replaced by a linear map T [H, H] fitted in closed form on calibration
tokens and folded into the down projection of layer a−1, so the result is a stock checkpoint with
fewer layers and no new tensor. With M the FF output of layer a−1 and L_j the hidden state after
layer j (both of the original model), the residual stream after layer a−1 is Y + M with
Y = L_{a−1} − M; the map makes Y + M T stand for L_b:

    T = argmin Σ_t w_t ‖m_t T − (L_b − L_{a−1} + M)_t‖² + λ‖T‖²  (λ relative to mean diag MᵀWM),

with w_t = 1/‖target_t‖² (``map_loss: relative``, the default: SmolLM2's attention-sink token
carries hidden states hundreds of times larger than the rest and decides a plain fit alone) or
w_t = 1 (``mse``, as published),

and M T = (h W_downᵀ + b) T is layer a−1's FF with ``W_down ← Tᵀ W_down`` (``b ← b T``). In a MoE
layer a−1 the FF output is the routed (and shared) experts' weighted sum, linear in every expert's
output, so T is folded into every expert's down projection (and the shared expert's) exactly;
the router is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.methods.base import BuildContext, MethodConfig, method_layers
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.overlay import Overlay
from mlpfuse.stages.model.runner import BatchState


class LayerDropMethod(MethodConfig):
    method: Literal["layer_drop"] = "layer_drop"
    # ReplaceMe: fold a fitted linear map for each dropped run into the layer before it (reads the
    # calibration tokens; a run cannot start at layer 0).
    linear_map: bool = False
    # The map's ridge, relative to the mean diagonal of MᵀM.
    map_lam: float = Field(1e-4, ge=0)
    # relative: each calibration token's residual weighted by 1/‖target‖² (a few tokens, such as
    # an attention sink, carry hidden states hundreds of times larger than the rest and would
    # otherwise decide the fit alone); mse: plain least squares, as published.
    map_loss: Literal["relative", "mse"] = "relative"

    @property
    def reads_tokens(self) -> bool:
        return self.linear_map


class FFDropMethod(MethodConfig):
    method: Literal["ff_drop"] = "ff_drop"


def drop_ff_block(m: FFDropMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights,
                  size: int | None = None) -> FFWeights:
    """The FF sublayer removed: a block of zero neurons (the layer's residual path stays)."""
    return ff.select(torch.zeros(0, dtype=torch.long))


def drop_layers(m: LayerDropMethod, ctx: BuildContext) -> Overlay:
    """Whole decoder layers removed (with ``linear_map``: each run's map folded into the layer
    before it)."""
    ov = Overlay(skip=set(method_layers(m, ctx.num_layers)))
    if len(ov.skip) >= ctx.num_layers:
        raise InputError("layer_drop would remove every layer")
    if m.linear_map:
        runs = contiguous_runs(sorted(ov.skip))
        if runs[0][0] == 0:
            raise InputError("layer_drop with linear_map: a dropped run starting at layer 0 has no layer before it "
                             "to fold its map into")
        for (a, _), t in zip(runs, fit_linear_maps(ctx, runs, m.map_lam, m.map_loss), strict=True):
            ov.blocks[a - 1] = {ref: fold_map(ctx.block(a - 1, ref), t) for ref in ctx.refs(a - 1)}
    return ov


def _check_fold(ctx: BuildContext, i: int, state: BatchState, m_out: Tensor, l_out: Tensor, t: Tensor) -> None:
    """Layer ``i`` with ``t`` folded into its FF must output ``L − M + M T`` (exact where the FF
    output is added to the residual stream as it is; a norm after the FF, as in Gemma 3 or BERT,
    breaks it): checked on one batch, or an error naming the family."""
    from mlpfuse.stages.model.overlay import ff_patch

    base = ctx.model.layer_state(i)
    folded = {ref: fold_map(ctx.block(i, ref), t) for ref in ctx.refs(i)}
    with ctx.model.layer(i, {**base, **ff_patch(ctx.family, ctx.config, base, folded)}) as layer:
        got = ctx.model.apply(layer, i, state).float().reshape(l_out.shape)
    want = l_out - m_out + (m_out.double() @ t).float()
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if err > 1e-3:
        raise InputError(f"layer_drop with linear_map: the {ctx.family.name} family does not add its FF output to "
                         f"the residual stream unchanged (a folded map misses by {err:.1e}), so the map cannot be "
                         "folded into the down projection; use layer_drop without linear_map")


def map_foldable(shard_dir: Path) -> bool:
    """Whether a map can be folded into a layer's FF of this checkpoint, from the shard's metadata
    and layer 0's header alone: a causal decoder with no norm after its FF output (Gemma 2/3's
    ``post_feedforward_layernorm``; BERT's post-LN). :func:`_check_fold` checks it on tensors."""
    from mlpfuse.stages.model.families import FAMILIES
    from mlpfuse.stages.model.shards import layer_file, tensor_header

    meta = json.loads((shard_dir / "shard.json").read_text())
    family = FAMILIES.get(meta.get("model_type", ""))
    if family is None or not family.causal:
        return False
    return not any("post_feedforward" in k for k in tensor_header(shard_dir / layer_file(0)))


def contiguous_runs(layers: list[int]) -> list[tuple[int, int]]:
    """Sorted layer indices as maximal runs (first, last)."""
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def fold_map(ff: FFWeights, t: Tensor) -> FFWeights:
    """``ff`` whose output is multiplied by ``t`` [H, H] on the right: W_down ← Tᵀ W_down, b ← b T."""
    down = (t.T.double() @ ff.down.double()).to(ff.down.dtype)
    b = None if ff.b_down is None else (ff.b_down.double() @ t.double()).to(ff.b_down.dtype)
    return replace(ff, down=down, b_down=b)


def ff_output_module(ctx: BuildContext, i: int) -> str:
    """The submodule of layer i whose output is the FF sublayer's output M: the MoE block, or a
    dense block's down projection (some families have no module around their FF)."""
    if ctx.family.is_moe_layer(ctx.config, ctx.model.layer_shapes(i)) or ctx.family.dense is None:
        return ctx.family.ff_module
    return ctx.family.dense.down.removesuffix(".{}")


@torch.no_grad()
def fit_linear_maps(ctx: BuildContext, runs: list[tuple[int, int]], lam: float,
                    loss: Literal["relative", "mse"] = "relative") -> list[Tensor]:
    """ReplaceMe's map T [H, H] (float64) for each dropped run (a, b), from one pass of the
    original model over the calibration tokens up to the last run's end (one layer resident)."""
    from mlpfuse.stages.data import read_calib

    model = ctx.model
    calib = read_calib(ctx.need_data("layer_drop with linear_map"))
    states = [model.start(torch.from_numpy(calib[s : s + 4])) for s in range(0, len(calib), 4)]
    before = {a - 1: r for r, (a, _) in enumerate(runs)}
    end = {b: r for r, (_, b) in enumerate(runs)}
    hdim = states[0].hidden.shape[-1]
    mtm = [torch.zeros(hdim, hdim, dtype=torch.float64) for _ in runs]
    mtd = [torch.zeros(hdim, hdim, dtype=torch.float64) for _ in runs]
    kept: list[dict[int, tuple[Tensor, Tensor]]] = [{} for _ in runs]  # per run, per state: (M, L_{a-1})
    # The first batch entering each layer a-1, and its (M, L_{a-1}): the fold is checked on it.
    entering: dict[int, BatchState] = {}
    first: dict[int, tuple[Tensor, Tensor]] = {}
    for i in range(runs[-1][1] + 1):
        if i in before:
            s0 = states[0]
            entering[i] = BatchState(s0.input_ids, s0.attention_mask, s0.hidden.clone(), s0.layer_args)
        outs: list[Tensor] = []

        def grab(_m: torch.nn.Module, _args: tuple, out: Tensor | tuple[Tensor, ...], outs: list[Tensor] = outs) -> None:
            y = out[0] if isinstance(out, tuple) else out
            outs.append(y.detach().float().reshape(-1, y.shape[-1]))

        with model.layer(i) as layer:
            handle = layer.get_submodule(ff_output_module(ctx, i)).register_forward_hook(grab) if i in before else None
            try:
                for s in states:
                    s.hidden = model.apply(layer, i, s)
            finally:
                if handle is not None:
                    handle.remove()
        if i in before:
            r = before[i]
            kept[r] = {j: (outs[j], s.hidden.float().reshape(-1, hdim).clone()) for j, s in enumerate(states)}
            first[i] = kept[r][0]
        if i in end:
            r = end[i]
            for j, s in enumerate(states):
                m_out, l_prev = kept[r].pop(j)
                d = s.hidden.float().reshape(-1, hdim) - l_prev + m_out
                mw = m_out / d.square().sum(-1, keepdim=True).clamp_min(1e-12) if loss == "relative" else m_out
                mtm[r] += (mw.T @ m_out).double()
                mtd[r] += (mw.T @ d).double()
    maps = []
    for (a, _), a_mat, b_mat in zip(runs, mtm, mtd, strict=True):
        a_mat.diagonal().add_(lam * float(a_mat.diagonal().mean()) or 1e-12)
        maps.append(torch.linalg.solve(a_mat, b_mat))
        _check_fold(ctx, a - 1, entering[a - 1], *first[a - 1], maps[-1])
    return maps
