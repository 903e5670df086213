"""compress: build one compressed candidate (an overlay on the base shards) with one method.

Methods (papers' and baselines', all on equal footing; ``method:`` selects one):

- ``fusion``     MLP Fusion: k-means of sub-MLPs per layer (per expert for MoE; router untouched),
                 counts P folded into the down projection (``mode: cluster`` = the paper's plain
                 clustering baseline, √P split between in and out weights). ``weighting: energy``
                 weights each neuron by its activation energy E[h²]·‖d‖² in k-means;
                 ``sqrt_energy`` scales each sub-MLP vector by √energy before clustering.
- ``prune``      structured neuron pruning: ``activation`` (E[h_i²]·‖W_out[:, i]‖², from collect's
                 statistics), ``magnitude`` (‖W_in row‖·‖W_out col‖) or ``random``.
- ``merge``      FF merging: a window of adjacent layers aligned to an anchor by feature
                 correlation + LAP (``permute: false`` = vanilla), averaged, and tied. MoE
                 windows tie whole MoE blocks: experts matched one-to-one across layers by
                 output correlation (LAP), neurons aligned per matched pair, router rows averaged
                 in the matched order.
- ``layer_drop`` whole decoder layers removed; ``ff_drop`` FF sublayers removed.
- ``moefy``      MLPMoE: static-MoE slicing, then Compensated Pruning of branches or Fractal Fade.

``refit`` (any method that removes or fuses neurons): the down projection (and bias) of every
changed block is re-solved by ridge least squares so the block's output matches the original
block's on the calibration tokens (``W' = (HᵀH + λI)⁻¹ HᵀY``, HᵀH/HᵀY streamed in float64 row
chunks; a tied window fits one shared projection over all its layers). A pruned or MLPMoE
block's statistics come from collect's HᵀH of the original block where it exists (its kept neurons'
rows and columns, and ``HᵀY = G[kept, :] W_downᵀ``), so no token is read. Compressed blocks
are kept in the checkpoint's stored precision, as they are written; each is upcast to float32
only while it computes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor

from stages import alignment, fusion, moefy, pruning
from stages.artifacts import write_atomic, write_json_atomic
from stages.collect import block_features, moments, read_features, read_inputs, read_stats
from stages.errors import InputError
from stages.families import FFBlockRef, FFWeights
from stages.overlay import Overlay, OverlayWriter
from stages.refit import RefitAccumulator, refit_down
from stages.runner import LayerStreamedModel


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Layers to compress (None: all). Papers often spare the first layers; the planner chooses.
    layers: tuple[int, ...] | None = None


class _Sized(_Method):
    # Neurons kept per block: an absolute count, or a fraction of the block's intermediate size.
    keep: int | None = Field(None, ge=0)
    ratio: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_size(self) -> _Sized:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("give exactly one of keep (neurons) or ratio (fraction kept)")
        return self

    def k(self, size: int) -> int:
        # A ratio rounds down, so a parameter budget computed from it is never exceeded.
        k = self.keep if self.keep is not None else int(math.floor((self.ratio or 0) * size + 1e-9))
        if not 1 <= k <= size:
            raise InputError(f"cannot keep {k} of {size} neurons (keep={self.keep}, ratio={self.ratio})")
        return k


class FusionMethod(_Sized):
    method: Literal["fusion"] = "fusion"
    mode: Literal["fusion", "cluster"] = "fusion"
    weighting: Literal["none", "energy", "sqrt_energy"] = "none"
    iters: int = Field(30, ge=1)
    seed: int = 0


class PruneMethod(_Sized):
    method: Literal["prune"] = "prune"
    criterion: Literal["activation", "magnitude", "random"] = "activation"
    seed: int = 0
    # uniform: every block keeps the same fraction. sensitivity: the same total is kept, spread
    # over the layers by one global ranking of each neuron's share of its block's score, so blocks
    # whose output rests on few neurons lose more and blocks that need many keep them (per-layer
    # sizes: saves loaded parameters in the tied export).
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    # sensitivity: no block keeps fewer than this fraction of its neurons.
    min_ratio: float = Field(0.125, gt=0, le=1)


class MergeMethod(_Method):
    method: Literal["merge"] = "merge"
    start: int = Field(ge=0)
    size: int = Field(ge=2)
    anchor: Literal["first", "middle", "last"] = "first"
    permute: bool = True
    feature: Literal["up", "gate", "hidden"] = "up"
    # MoE windows: calibration tokens (a seeded sample) on which experts are matched across layers
    # and their neurons aligned (dense windows use every token of collect's features).
    moe_tokens: int = Field(1024, ge=16)


class LayerDropMethod(_Method):
    method: Literal["layer_drop"] = "layer_drop"


class FFDropMethod(_Method):
    method: Literal["ff_drop"] = "ff_drop"


class MoefyMethod(_Method):
    method: Literal["moefy"] = "moefy"
    branches: int = Field(8, ge=2)
    # contiguous: index slices (the paper). importance: bands of the data-free score
    # ||W_in row|| * ||W_out col||. activation: bands of the activation-aware score
    # E[h_i^2] * ||W_out col||^2 from collect's statistics (also used for the compensation gains).
    assignment: Literal["contiguous", "importance", "activation"] = "contiguous"
    op: Literal["compensated", "fade", "none"] = "compensated"
    # compensated: fraction of branches kept; fade: fraction of neurons removed.
    keep_branches: float = Field(0.75, gt=0, le=1)
    sparsity: float = Field(0.25, ge=0, lt=1)
    compensate: bool = True
    schedule: Literal["uniform", "linear", "geometric"] = "linear"


Method = Annotated[
    FusionMethod | PruneMethod | MergeMethod | LayerDropMethod | FFDropMethod | MoefyMethod,
    Field(discriminator="method"),
]


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


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate: Method
    # Decoder layers removed whole in addition (combinations: drop k layers + prune the rest).
    drop: tuple[int, ...] = ()
    refit: RefitConfig | None = None


class _Context:
    """What a method may read: base layer tensors, FF blocks, collect's statistics and inputs."""

    def __init__(self, shard_dir: Path, collect_dir: Path | None):
        self.model = LayerStreamedModel(shard_dir)
        self.family, self.config = self.model.family, self.model.config
        self.num_layers = self.model.num_layers
        self.collect_dir = collect_dir
        # The checkpoint's stored floating-point precision: compressed blocks are kept in it
        # (upcast one block at a time where a method computes), as they will be written.
        self.dtype = next((t.dtype for t in self.model.layer_shapes(0).values() if t.is_floating_point()),
                          torch.float32)
        self._states: dict[int, dict[str, Tensor]] = {}
        # One layer's collect statistics and FF inputs, read once for all of its blocks.
        self._stats: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self._inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Fused blocks' count vectors P (training form: y = W_out' (P ⊙ act(W_in' x))).
        self.counts: dict[str, Tensor] = {}
        # MLPMoE blocks' static-MoE form (branch of every original neuron, -1 pruned; gains α).
        self.branches: dict[str, Tensor] = {}
        # Kept neuron indices of blocks whose hidden is a subset of the original's (pruned, and
        # MLPMoE's dense form): their refit is solved from collect's HᵀH alone.
        self.kept: dict[str, Tensor] = {}

    def state(self, i: int) -> dict[str, Tensor]:
        if i not in self._states:
            self._states = {i: self.model.layer_state(i)}  # one layer's tensors cached
        return self._states[i]

    def refs(self, i: int) -> list[FFBlockRef]:
        """Layer i's FF blocks (from the layer file's header: nothing is read)."""
        return self.family.ff_blocks(self.config, self.model.layer_shapes(i))

    def stored(self, i: int, ref: FFBlockRef) -> FFWeights:
        """One FF block of layer i in its stored precision (views of the layer's tensors)."""
        return self.family.read_ff(self.config, self.state(i), ref)

    def block(self, i: int, ref: FFBlockRef) -> FFWeights:
        """One FF block of layer i in float32."""
        return self.stored(i, ref).to(torch.float32)

    def blocks(self, i: int) -> dict[FFBlockRef, FFWeights]:
        return {r: self.block(i, r) for r in self.refs(i)}

    def shapes(self, i: int) -> dict[FFBlockRef, FFWeights]:
        """Layer i's base FF blocks on the meta device (sizes only; nothing is read)."""
        sd = self.model.layer_shapes(i)
        return {r: self.family.read_ff(self.config, sd, r) for r in self.family.ff_blocks(self.config, sd)}

    def need_collect(self, what: str) -> Path:
        if self.collect_dir is None:
            raise InputError(f"{what} needs calibration statistics: add the collect stage's output")
        return self.collect_dir

    def energy(self, i: int, ref: FFBlockRef) -> np.ndarray:
        """E[h_i²] of block ``ref``'s neurons from collect's sums."""
        return moments(self.stats(i, "activation-aware scoring")[ref.name], "hidden")[2]

    def stats(self, i: int, what: str) -> dict[str, dict[str, np.ndarray]]:
        """collect's statistics of layer i, per block (one layer cached)."""
        if i not in self._stats:
            self._stats = {i: read_stats(self.need_collect(what), i)}
        return self._stats[i]

    def _layer_inputs(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, FF inputs x) of layer i from collect (one layer cached, read-only)."""
        if i not in self._inputs:
            self._inputs = {i: read_inputs(self.need_collect("refit"), i)}
        return self._inputs[i]

    def rows_of(self, i: int, ref: FFBlockRef, x_all: Tensor) -> Tensor:
        """The rows of ``x_all`` (every calibration token, in token order) that match
        :meth:`block_inputs`'s rows."""
        tok, _ = self._layer_inputs(i)
        if ref.kind == "expert":
            etok, _ = read_features(self.need_collect("refit"), i, ref.name, "hidden")
            tok = tok[np.searchsorted(tok, etok)]
        return x_all[torch.tensor(tok, dtype=torch.long)]

    def block_inputs(self, i: int, ref: FFBlockRef) -> Tensor:
        """The block's calibration inputs x [n, H] (MoE experts: the tokens routed to them)."""
        tok, x = self._layer_inputs(i)
        if ref.kind == "expert":
            etok, _ = read_features(self.need_collect("refit"), i, ref.name, "hidden")
            x = x[np.searchsorted(tok, etok)]
        return torch.tensor(x, dtype=torch.float32)  # a copy: the read is a read-only view


def _shape_only(ff: FFWeights) -> FFWeights:
    """``ff`` with zero-size storage but its sizes and layout (for parameter accounting after the
    block's tensors were written and released)."""
    def z(t: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
        return None if t is None else torch.empty(shape, device="meta")

    n, h = ff.intermediate_size, ff.hidden_size
    return FFWeights(up=z(ff.up, (n, ff.up.shape[1])), gate=z(ff.gate, (n, ff.up.shape[1])),
                     down=z(ff.down, (h, n)), b_up=z(ff.b_up, (n,)), b_down=z(ff.b_down, (h,)), act=ff.act)


# Fused blocks' P vectors (keys ``L<layer>/<block>``), read by the layer_errors stage's NTK.
COUNTS = "counts.safetensors"
# Pruned and MLPMoE candidates' kept neuron indices (keys ``L<layer>/<block>``, int64, ascending).
KEPT = "kept.safetensors"
# MLPMoE candidates' static-MoE form, for inspection (keys ``L<layer>/<block>/branch`` and
# ``.../alpha``; :func:`static_moe` rebuilds the module from the base weights).
BRANCHES = "moefy_branches.safetensors"


def _layers(m: _Method, n: int) -> list[int]:
    layers = list(range(n)) if m.layers is None else sorted(set(m.layers))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise InputError(f"layers {bad} do not exist (the model has {n} layers: 0..{n - 1})")
    return layers


def _build(m: BaseModel, ctx: _Context) -> Overlay:
    ov = Overlay()
    if isinstance(m, LayerDropMethod):
        ov.skip = set(_layers(m, ctx.num_layers))
        if len(ov.skip) >= ctx.num_layers:
            raise InputError("layer_drop would remove every layer")
        return ov
    if isinstance(m, MergeMethod):
        return _merge(m, ctx)
    for i, new in _iter_layers(m, ctx):
        ov.blocks[i] = new
    return ov


def _iter_layers(m: BaseModel, ctx: _Context) -> Iterator[tuple[int, dict[FFBlockRef, FFWeights]]]:
    """(layer, its compressed FF blocks), one layer at a time (per-block methods)."""
    sizes = _sensitivity_sizes(m, ctx) if isinstance(m, PruneMethod) and m.allocation == "sensitivity" else {}
    for i in _layers(m, ctx.num_layers):  # type: ignore[arg-type]
        # One block in float32 at a time (an MoE layer's experts are not all upcast at once); each
        # result is kept in the stored precision it will be written in.
        yield i, {ref: _compress_block(m, ctx, i, ref, ctx.block(i, ref), sizes.get((i, ref))).to(ctx.dtype)
                  for ref in ctx.refs(i)}


def _prune_scores(m: PruneMethod, ctx: _Context, i: int, ref: FFBlockRef, ff: FFWeights) -> Tensor:
    if m.criterion == "activation":
        return pruning.activation_scores(ff, torch.from_numpy(ctx.energy(i, ref)).float())
    if m.criterion == "magnitude":
        return pruning.magnitude_scores(ff)
    return pruning.random_scores(ff, seed=m.seed + 7919 * i)


def _sensitivity_sizes(m: PruneMethod, ctx: _Context) -> dict[tuple[int, FFBlockRef], int]:
    """Neurons kept per block when ``m``'s total is spread by one global ranking: each neuron's
    score as a share of its block's total, so a neuron is cut where it matters least to its own
    block's output; every block keeps at least ``min_ratio``, the total kept equals uniform's."""
    shares, floors, total = [], {}, 0
    for i in _layers(m, ctx.num_layers):
        for ref in ctx.refs(i):
            ff = ctx.block(i, ref)
            sc = _prune_scores(m, ctx, i, ref, ff).double()
            n = ff.intermediate_size
            total += m.k(n)
            floors[(i, ref)] = max(1, math.ceil(m.min_ratio * n))
            order = torch.sort(sc, descending=True).values / max(float(sc.sum()), 1e-30)
            shares += [(float(v), j, (i, ref)) for j, v in enumerate(order.tolist()) if j >= floors[(i, ref)]]
    sizes = dict(floors)
    spare = total - sum(floors.values())
    if spare < 0:
        raise InputError(f"min_ratio={m.min_ratio} keeps more neurons than the budget allows")
    # Within a block, shares are in descending order, so taking the largest shares globally keeps
    # each block's top neurons: the count per block is all that matters.
    for _, _, key in sorted(shares, key=lambda t: (-t[0], t[1]))[:spare]:
        sizes[key] += 1
    return sizes


def _compress_block(m: BaseModel, ctx: _Context, i: int, ref: FFBlockRef, ff: FFWeights,
                    size: int | None = None) -> FFWeights:
    if isinstance(m, FFDropMethod):
        return ff.select(torch.zeros(0, dtype=torch.long))
    if isinstance(m, PruneMethod):
        k = size if size is not None else m.k(ff.intermediate_size)
        kept = pruning.kept_neurons(_prune_scores(m, ctx, i, ref, ff), k)
        ctx.kept[f"L{i:05d}/{ref.name}"] = kept
        return ff.select(kept)
    if isinstance(m, FusionMethod):
        k = m.k(ff.intermediate_size)
        energy = None
        if m.weighting != "none":
            energy = ctx.energy(i, ref) * (ff.down.double() ** 2).sum(0).numpy()
        fused = fusion.fuse_ff(
            ff, k, iters=m.iters, seed=m.seed, mode=m.mode,
            weights=energy if m.weighting == "energy" else None,
            scale_by_sqrt_energy=energy if m.weighting == "sqrt_energy" else None,
        )
        if m.mode == "fusion":  # the training form's fixed P, kept beside the folded export form
            ctx.counts[f"L{i:05d}/{ref.name}"] = fused.scale.float().contiguous()
        return fused.fold()
    if isinstance(m, MoefyMethod):
        hsm = torch.from_numpy(ctx.energy(i, ref)).double() if m.assignment == "activation" else None
        method = "importance" if m.assignment == "activation" else m.assignment
        moe = moefy.StaticMoE.from_dense(ff, m.branches, method, hidden_second_moment=hsm)
        if m.op == "compensated":
            moe = moefy.compensated_prune(moe, m.keep_branches, compensate=m.compensate, hidden_second_moment=hsm)
        elif m.op == "fade":
            moe = moefy.fractal_fade(moe, m.sparsity, m.schedule, hidden_second_moment=hsm)
        branch, alpha = moefy.branch_map(moe)
        ctx.branches[f"L{i:05d}/{ref.name}/branch"], ctx.branches[f"L{i:05d}/{ref.name}/alpha"] = branch, alpha
        # The dense form keeps the surviving neurons unchanged, in their order (α scales down).
        ctx.kept[f"L{i:05d}/{ref.name}"] = torch.nonzero(branch >= 0).reshape(-1).long()
        return moefy.to_dense(moe)
    raise InputError(f"unsupported method {type(m).__name__}")


def _merge(m: MergeMethod, ctx: _Context) -> Overlay:
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
        perms = [None] * m.size
    # Averaged one layer at a time from the stored weights (one layer's tensors resident).
    merged = alignment.merge_window((ctx.stored(i, ref) for i in window), list(perms))
    ov = Overlay()
    for i in window:
        ov.blocks[i] = {ref: merged}
    ov.tied = [window]
    return ov


def _window_sample(ctx: _Context, window: list[int], n: int) -> list[Tensor]:
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


def _moe_extra_keys(ctx: _Context, i: int) -> list[str]:
    """The MoE block's tensors besides its experts and shared expert (router, shared-expert gate)."""
    moe = ctx.family.moe
    assert moe is not None
    shared: set[str] = set()
    if moe.shared is not None:
        spec = moe.shared
        shared = {n.format(w) for n in (spec.up, spec.gate, spec.down) if n is not None for w in ("weight", "bias")}
    return sorted(k for k in ctx.state(i) if k.startswith(ctx.family.ff_module + ".")
                  and not k.startswith(f"{moe.path}.") and k not in shared)


def _merge_moe(m: MergeMethod, ctx: _Context, window: list[int], refs: list[FFBlockRef], anchor: int) -> Overlay:
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
    del blocks
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


def _refit(ov: Overlay, ctx: _Context, cfg: RefitConfig, data_dir: Path | None = None) -> dict[str, list[float]]:
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
    layers = sorted(before)
    return {"layers": layers, "before": [before[i] for i in layers], "after": [after[i] for i in layers]}


def _gram_statistics(ctx: _Context, group: list[int], ref: FFBlockRef, new: FFWeights) -> RefitAccumulator | None:
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


def _compressed_inputs(ov: Overlay, ctx: _Context, data_dir: Path) -> Iterator[tuple[int, Tensor]]:
    """Walk the calibration blocks through the compressed model one layer at a time, yielding
    (layer, the FF input x of every calibration token [n_tokens, H]) for each changed layer
    *before* it is applied; the caller refits it in ``ov`` and the walk then applies the result."""
    from stages.data import read_calib
    from stages.overlay import ff_patch

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


def _iter_overlay(overlay_dir: Path, ctx: _Context) -> Iterator[tuple[int, dict[FFBlockRef, FFWeights]]]:
    """(layer, its FF blocks) of an overlay written by :func:`save_overlay`, one layer at a time
    (skipped layers left out)."""
    meta = json.loads((overlay_dir / "overlay.json").read_text())
    for i, entry in sorted(meta["layers"].items(), key=lambda kv: int(kv[0])):
        if entry.get("skip"):
            continue
        sd = {**ctx.state(int(i)), **load_file(str(overlay_dir / entry["patch"]))}
        yield int(i), {r: ctx.family.read_ff(ctx.config, sd, r) for r in ctx.family.ff_blocks(ctx.config, sd)}


def _load_overlay(overlay_dir: Path, ctx: _Context) -> Overlay:
    """An overlay written by :func:`save_overlay`, read back as FF blocks."""
    meta = json.loads((overlay_dir / "overlay.json").read_text())
    ov = Overlay(tied=[list(g) for g in meta.get("tied", [])])
    ov.skip = {int(i) for i, entry in meta["layers"].items() if entry.get("skip")}
    ov.blocks = dict(_iter_overlay(overlay_dir, ctx))
    return ov


def static_moe(candidate_dir: Path, shard_dir: Path, layer: int, block: str = "mlp") -> moefy.StaticMoE:
    """An MLPMoE candidate's block as the static mixture of experts it was pruned as (branches,
    gains α), rebuilt from the base shard and the candidate's branch map: for inspection."""
    path = candidate_dir / BRANCHES
    if not path.exists():
        raise InputError(f"{candidate_dir} has no {BRANCHES}: not an MLPMoE candidate, or built before "
                         "branch maps were recorded (rebuild it with --force compress)")
    maps = load_file(str(path))
    key = f"L{layer:05d}/{block}"
    if f"{key}/branch" not in maps:
        raise InputError(f"{candidate_dir}: layer {layer} block {block!r} was not transformed by MLPMoE")
    ctx = _Context(shard_dir, None)
    ff = next(f for r, f in ctx.blocks(layer).items() if r.name == block)
    return moefy.from_branch_map(ff, maps[f"{key}/branch"], maps[f"{key}/alpha"])


def param_counts(shard_meta: dict, sizes: dict[int, dict[str, int]], skip: set[int], tied: list[list[int]],
                 per_neuron: dict[str, int], const: dict[str, int], tied_other: int = 0) -> dict[str, int]:
    """Parameters of the compressed model: ``stock`` (as plain transformers loads it: one FF size
    per block kind, smaller blocks zero-padded, tied windows materialised) and ``unique``
    (each tied tensor once). ``sizes[i][block kind]`` = total intermediate neurons of that kind;
    ``tied_other``: non-FF parameters that tied windows also share (a merged MoE router), beyond
    their first layer."""
    p = shard_meta["params"]
    n = len(p["layers"])
    kept = [i for i in range(n) if i not in skip]
    non_ff = p["rest"] + sum(p["layers"][i] - p["ff_layers"][i] for i in kept)
    widest = {k: max(sizes[i][k] for i in kept if k in sizes[i]) for k in per_neuron}
    stock_ff = sum(widest[k] * per_neuron[k] + const[k] for i in kept for k in sizes[i])
    seen: set[int] = set()
    unique_ff = 0
    group_of = {i: tuple(g) for g in tied for i in g}
    for i in kept:
        g = group_of.get(i, (i,))
        if g[0] in seen:
            continue
        seen.add(g[0])
        unique_ff += sum(sizes[i][k] * per_neuron[k] + const[k] for k in sizes[i])
    return {"params": non_ff + stock_ff, "unique_params": non_ff - tied_other + unique_ff, "ff_params": stock_ff,
            "unique_ff_params": unique_ff, "padding": stock_ff - sum(
                sizes[i][k] * per_neuron[k] + const[k] for i in kept for k in sizes[i])}


def _block_kind(ref: FFBlockRef) -> str:
    return "expert" if ref.kind == "expert" else ref.kind


def run(config: CompressConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard``, ``collect`` (data-aware methods, refit), ``data`` (sequential refit)
    and, for a refit candidate, optionally ``unrefit``: the same candidate built without refit,
    whose blocks are reused."""
    ctx = _Context(inputs["shard"], inputs.get("collect"))
    m = config.candidate
    writer = OverlayWriter(out_dir, ctx.family, ctx.config, ctx.state, dtype=ctx.dtype)
    drop = set(_layers(LayerDropMethod(layers=config.drop), ctx.num_layers)) if config.drop else set()
    # Per-block methods without a cross-layer step stream: each layer is built (or read back from
    # the same candidate built without refit), refit, written and released before the next, so
    # one compressed layer is resident at a time.
    streamed = (not isinstance(m, (MergeMethod, LayerDropMethod))
                and not (config.refit is not None and config.refit.sequential))
    changed: dict[int, dict[FFBlockRef, FFWeights]] = {}
    tied_other = 0
    if streamed:
        overlap = sorted(drop & set(_layers(m, ctx.num_layers)))  # type: ignore[arg-type]
        if overlap:
            raise InputError(f"layers {overlap} are both dropped and compressed")
        errors: dict[str, list] | None = {"layers": [], "before": [], "after": []} if config.refit else None
        ov = Overlay(skip=drop)
        layers = _iter_layers(m, ctx)
        if "unrefit" in inputs:  # reuse its blocks: no re-clustering
            layers = _iter_overlay(inputs["unrefit"], ctx)
            for name, attr in ((COUNTS, "counts"), (BRANCHES, "branches"), (KEPT, "kept")):
                if (inputs["unrefit"] / name).exists():
                    setattr(ctx, attr, load_file(str(inputs["unrefit"] / name)))
        for i, blocks in layers:
            one = Overlay(blocks={i: blocks})
            if config.refit is not None and errors is not None:
                for k, v in _refit(one, ctx, config.refit).items():
                    errors[k] += v
            writer.add(i, one.blocks[i])
            changed[i] = {ref: _shape_only(ff) for ref, ff in one.blocks[i].items()}
        if errors is not None and not errors["layers"]:
            errors = None
    else:
        # The same candidate built without refit: reuse it (no re-clustering). Merged MoE windows
        # are rebuilt (their expert matching is not stored with the overlay; it is cheap).
        if "unrefit" in inputs and not (isinstance(m, MergeMethod) and ctx.family.is_moe_layer(ctx.config, ctx.state(m.start))):
            ov = _load_overlay(inputs["unrefit"], ctx)
            for name, attr in ((COUNTS, "counts"), (KEPT, "kept")):
                if (inputs["unrefit"] / name).exists():
                    setattr(ctx, attr, load_file(str(inputs["unrefit"] / name)))
        else:
            ov = _build(m, ctx)
        overlap = sorted(drop & set(ov.blocks))
        if overlap:
            raise InputError(f"layers {overlap} are both dropped and compressed")
        ov.skip |= drop
        errors = _refit(ov, ctx, config.refit, inputs.get("data")) if config.refit is not None and ov.blocks else None
        group_of = {i: g for g in ov.tied for i in g}
        for i in sorted(ov.blocks):
            writer.add(i, ov.blocks[i], group_of.get(i), ov.extra.get(i))
        changed = {i: {ref: _shape_only(ff) for ref, ff in b.items()} for i, b in ov.blocks.items()}
        # Tied non-FF tensors (a merged MoE router) are stored once too.
        tied_other = sum((len(g) - 1) * sum(t.numel() for t in ov.extra.get(g[0], {}).values()) for g in ov.tied)
        ov.extra = {}
        ov.blocks = {}
    # Sizes of every layer's blocks after compression, for parameter accounting.
    sizes: dict[int, dict[str, int]] = {}
    per_neuron: dict[str, int] = {}
    const: dict[str, int] = {}
    for i in range(ctx.num_layers):
        sizes[i] = {}
        for ref, ff in {**ctx.shapes(i), **changed.get(i, {})}.items():
            kind = _block_kind(ref)
            sizes[i][kind] = sizes[i].get(kind, 0) + ff.intermediate_size
            per_neuron[kind] = ff.hidden_size * (3 if ff.is_glu else 2) + (1 if ff.b_up is not None else 0)
            const[kind] = ff.hidden_size if ff.b_down is not None and kind != "expert" else 0
    shard_meta = json.loads((inputs["shard"] / "shard.json").read_text())
    counts = param_counts(shard_meta, sizes, ov.skip, ov.tied, per_neuron, const, tied_other)
    writer.finish(ov.skip, ov.tied)
    if ctx.counts:
        write_atomic(out_dir / COUNTS, lambda p: save_file(ctx.counts, str(p)))
    if ctx.branches:
        write_atomic(out_dir / BRANCHES, lambda p: save_file(ctx.branches, str(p)))
    if ctx.kept:
        write_atomic(out_dir / KEPT, lambda p: save_file(ctx.kept, str(p)))
    method = {"method": m.method, "settings": m.model_dump(mode="json"),
              "refit": None if config.refit is None else config.refit.model_dump()}
    write_json_atomic(out_dir / "method.json", method)
    result = {**counts, "changed_layers": sorted(set(changed) | ov.skip), "skipped": sorted(ov.skip), "tied": ov.tied}
    if errors is not None:
        result["refit_errors"] = errors
    return result

