"""FF merging (``method: merge``): a window of adjacent layers aligned to an anchor by feature
correlation and linear assignment (``permute: false`` for vanilla averaging), averaged and tied;
MoE windows tie whole MoE blocks, experts matched across layers by output correlation."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math import alignment
from mlpfuse.stages.math.ffweights import block_features
from mlpfuse.stages.methods.base import BuildContext, MethodConfig
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.features import read_features, read_inputs
from mlpfuse.stages.model.overlay import Overlay


class MergeMethod(MethodConfig):
    method: Literal["merge"] = "merge"
    start: int = Field(ge=0)
    size: int = Field(ge=2)
    anchor: Literal["first", "middle", "last"] = "first"
    permute: bool = True
    feature: Literal["up", "gate", "hidden"] = "up"
    # MoE windows: calibration tokens (a seeded sample) on which experts are matched across layers
    # and their neurons aligned (dense windows use every token of collect's features).
    moe_tokens: int = Field(1024, ge=16)


def build_merge(m: MergeMethod, ctx: BuildContext) -> Overlay:
    window = list(range(m.start, m.start + m.size))
    if window[-1] >= ctx.num_layers:
        raise InputError(f"merge window {window[0]}..{window[-1]} exceeds the model's {ctx.num_layers} layers")
    refs = ctx.refs(window[0])
    for i in window:
        if (b := ctx.refs(i)) != refs:
            raise InputError(
                f"merge window {window[0]}..{window[-1]}: layer {i}'s FF blocks ({', '.join(r.name for r in b)}) "
                f"differ from layer {window[0]}'s ({', '.join(r.name for r in refs)}); a window ties layers of "
                "one kind (all dense, or all MoE with the same experts)"
            )
    anchor = {"first": 0, "middle": (m.size - 1) // 2, "last": m.size - 1}[m.anchor]
    if any(r.kind != "dense" for r in refs):
        return _merge_moe(m, ctx, window, refs, anchor)
    ref = refs[0]
    if m.permute:  # from collect's features alone: no weights are held while the LAPs run
        d = ctx.need_collect("aligned merging")
        feats = [read_features(d, i, ref.name, m.feature)[1].astype(np.float32) for i in window]
        perms = alignment.align_window(feats, anchor).perms
        del feats
    else:
        perms = [None] * m.size  # type: ignore[list-item]  # identity: vanilla merging
    # Averaged one layer at a time from the stored weights (one layer's tensors resident).
    merged = alignment.merge_window((ctx.stored(i, ref) for i in window), list(perms))
    ov = Overlay()
    for i in window:
        ov.blocks[i] = {ref: merged}
    ov.tied = [window]
    return ov


def _window_sample(ctx: BuildContext, window: list[int], n: int) -> list[Tensor]:
    """Each window layer's FF inputs at the same seeded sample of ``n`` calibration tokens."""
    d = ctx.need_collect("aligned merging of MoE layers")
    if not (d / "inputs").is_dir():
        raise InputError("aligned merging of MoE layers needs collect's FF inputs: set collect.inputs: true")
    out: list[Tensor] = []
    pick = np.zeros(0, dtype=np.int64)
    for i in window:
        t, x = read_inputs(d, i)
        if not out:  # the sample: drawn from the first layer's tokens
            pick = np.sort(np.random.default_rng(0).choice(t, size=min(n, len(t)), replace=False))
        rows = np.searchsorted(t, pick)
        if (rows >= len(t)).any() or not np.array_equal(t[np.minimum(rows, len(t) - 1)], pick):
            raise InputError(f"collect's inputs of layer {i} do not cover the calibration tokens of layer {window[0]}")
        out.append(torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32)))
        del x
    return out


def _moe_extra_keys(ctx: BuildContext, i: int) -> list[str]:
    """The MoE block's tensors besides its experts and shared expert (router, shared-expert gate)."""
    moe = ctx.family.moe
    assert moe is not None
    shared: set[str] = set()
    if moe.shared is not None:
        spec = moe.shared
        shared = {n.format(w) for n in (spec.up, spec.gate, spec.down) if n is not None for w in ("weight", "bias")}
    return sorted(k for k in ctx.state(i) if k.startswith(ctx.family.ff_module + ".")
                  and not k.startswith(f"{moe.path}.") and k not in shared)


def _merge_moe(m: MergeMethod, ctx: BuildContext, window: list[int], refs: list[FFBlockRef], anchor: int) -> Overlay:
    """Tie whole MoE blocks across a window: every layer's experts are matched one-to-one to the
    anchor's by output correlation (LAP over experts), each matched pair's neurons aligned by
    feature correlation (LAP), then experts, shared expert, router rows (in the matched order) and
    the shared-expert gate are averaged. ``permute: false`` averages experts by index (vanilla)."""
    moe = ctx.family.moe
    assert moe is not None
    w = len(window)
    experts = [r for r in refs if r.kind == "expert"]
    others = [r for r in refs if r.kind != "expert"]
    match = [np.arange(len(experts))] * w  # match[k][e]: layer k's expert that merged expert e takes
    perms: dict[FFBlockRef, list] = {r: [None] * w for r in refs}
    # The window's blocks in their stored precision (each upcast only while it computes), and its
    # other MoE tensors (router, shared-expert gate), each layer read once.
    keys = _moe_extra_keys(ctx, window[0])
    blocks, extras = [], []
    for i in window:
        blocks.append({r: ctx.stored(i, r) for r in refs})
        sd = ctx.state(i)
        missing = [key for key in keys if key not in sd]
        if missing:
            raise InputError(f"merge window: layer {i} has no {missing[0]} (layer {window[0]} has)")
        extras.append({key: sd[key] for key in keys})
    if m.permute:
        xs = _window_sample(ctx, window, m.moe_tokens)

        def feat(k: int, ref: FFBlockRef) -> Tensor:
            return block_features(blocks[k][ref].to(torch.float32), xs[k], (m.feature,))[m.feature]

        def out(k: int, ref: FFBlockRef) -> Tensor:
            return blocks[k][ref].to(torch.float32).forward(xs[k])

        with torch.no_grad():
            anchor_out = [out(anchor, r) for r in experts]
            for k in range(w):
                if k == anchor:
                    continue
                match[k] = alignment.match_experts(anchor_out, [out(k, r) for r in experts])[0]
                for e, r in enumerate(experts):
                    perms[r][k] = alignment.align_window([feat(anchor, r), feat(k, experts[match[k][e]])], 0).perms[1]
                for r in others:
                    perms[r][k] = alignment.align_window([feat(anchor, r), feat(k, r)], 0).perms[1]
        del xs, anchor_out  # not held while the window is averaged and written
    merged = {r: alignment.merge_window((blocks[k][experts[match[k][e]]] for k in range(w)), perms[r])
              for e, r in enumerate(experts)}
    merged |= {r: alignment.merge_window((blocks[k][r] for k in range(w)), perms[r]) for r in others}
    blocks.clear()  # the window's stored blocks are no longer needed
    sums = {key: torch.zeros(t.shape) for key, t in extras[0].items()}
    for k, tensors in enumerate(extras):
        for key, t in tensors.items():
            routed = key.startswith(moe.router_module + ".") and t.shape[:1] == (len(experts),)
            sums[key] += (t[torch.from_numpy(match[k])] if routed else t).to(torch.float32)
    extra = {key: (sums[key] / w).to(extras[0][key].dtype) for key in keys}
    del extras
    ov = Overlay(tied=[window])
    for k, i in enumerate(window):
        ov.blocks[i] = dict(merged)
        ov.extra[i] = extra
        ov.sources[i] = {r: experts[match[k][e]] for e, r in enumerate(experts) if match[k][e] != e}
    return ov

