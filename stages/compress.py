"""compress: build one compressed candidate (an overlay on the base shards) with one method.

Methods (papers' and baselines', all on equal footing; ``method:`` selects one from the registry in
``mlpfuse.stages.methods``, which this stage dispatches through):

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
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from mlpfuse.core.artifacts import write_atomic, write_json_atomic
from mlpfuse.core.errors import InputError
from mlpfuse.stages.math import moefy
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.methods import Method, method_def
from mlpfuse.stages.methods.base import BuildContext, method_layers
from mlpfuse.stages.methods.drop import LayerDropMethod
from mlpfuse.stages.methods.merge import MergeMethod
from mlpfuse.stages.methods.refit import RefitConfig, refit_overlay
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.overlay import Overlay, OverlayWriter, read_overlay
from mlpfuse.stages.model.params import BlockShape, count_params


class CompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate: Method
    # Decoder layers removed whole in addition (combinations: drop k layers + prune the rest).
    drop: tuple[int, ...] = ()
    refit: RefitConfig | None = None

    @property
    def reads_tokens(self) -> bool:
        """Whether building it reads the calibration tokens (needs the data stage's output)."""
        return self.candidate.reads_tokens or (self.refit is not None and self.refit.sequential)


# Fused blocks' P vectors (keys ``L<layer>/<block>``), read by the layer_errors stage's NTK.
COUNTS = "counts.safetensors"
# Pruned and MLPMoE candidates' kept neuron indices (keys ``L<layer>/<block>``, int64, ascending).
KEPT = "kept.safetensors"
# MLPMoE candidates' static-MoE form, for inspection (keys ``L<layer>/<block>/branch`` and
# ``.../alpha``; :func:`static_moe` rebuilds the module from the base weights).
BRANCHES = "moefy_branches.safetensors"


def _build(m: Method, ctx: BuildContext) -> Overlay:
    d = method_def(m.method)
    if d.build_model is not None:
        return d.build_model(m, ctx)
    return Overlay(blocks=dict(_iter_layers(m, ctx)))


def _iter_layers(m: Method, ctx: BuildContext) -> Iterator[tuple[int, dict[FFBlockRef, FFWeights]]]:
    """(layer, its compressed FF blocks), one layer at a time (per-block methods)."""
    d = method_def(m.method)
    build = d.build_block
    assert build is not None, f"{m.method} is not a per-block method"
    sizes = d.sizes(m, ctx) if d.sizes is not None else {}
    for i in method_layers(m, ctx.num_layers):
        # One block in float32 at a time (an MoE layer's experts are not all upcast at once); each
        # result is kept in the stored precision it will be written in.
        yield i, {ref: build(m, ctx, i, ref, ctx.block(i, ref), sizes.get((i, ref))).to(ctx.dtype)
                  for ref in ctx.refs(i)}


def _iter_overlay(overlay_dir: Path, ctx: BuildContext) -> Iterator[tuple[int, dict[FFBlockRef, FFWeights]]]:
    """(layer, its FF blocks) of an overlay written by :func:`save_overlay`, one layer at a time
    (skipped layers left out)."""
    for i, sd in read_overlay(overlay_dir).iter_states(ctx.state):
        yield i, {r: ctx.family.read_ff(ctx.config, sd, r) for r in ctx.family.ff_blocks(ctx.config, sd)}


def _load_overlay(overlay_dir: Path, ctx: BuildContext) -> Overlay:
    """An overlay written by :func:`save_overlay`, read back as FF blocks."""
    meta = read_overlay(overlay_dir)
    ov = Overlay(tied=meta.tied, skip=set(meta.skip))
    ov.blocks = dict(_iter_overlay(overlay_dir, ctx))
    return ov


def _reuse_side_files(unrefit: Path, ctx: BuildContext) -> None:
    """What the same candidate built without refit recorded beside its blocks (fusion counts,
    MLPMoE branch maps, kept neuron indices), so the refit twin writes them too."""
    for name, attr in ((COUNTS, "counts"), (BRANCHES, "branches"), (KEPT, "kept")):
        if (unrefit / name).exists():
            setattr(ctx, attr, load_file(str(unrefit / name)))


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
    ctx = BuildContext(shard_dir, None)
    ff = next(f for r, f in ctx.blocks(layer).items() if r.name == block)
    return moefy.from_branch_map(ff, maps[f"{key}/branch"], maps[f"{key}/alpha"])


def run(config: CompressConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard``, ``collect`` (data-aware methods, refit), ``data`` (sequential refit,
    ReplaceMe's maps)
    and, for a refit candidate, optionally ``unrefit``: the same candidate built without refit,
    whose blocks are reused."""
    ctx = BuildContext(inputs["shard"], inputs.get("collect"), inputs.get("data"))
    m = config.candidate
    writer = OverlayWriter(out_dir, ctx.family, ctx.config, ctx.state, dtype=ctx.dtype)
    drop = set(method_layers(LayerDropMethod(layers=config.drop), ctx.num_layers)) if config.drop else set()
    # Per-block methods without a cross-layer step stream: each layer is built (or read back from
    # the same candidate built without refit), refit, written and released before the next, so
    # one compressed layer is resident at a time.
    streamed = (method_def(m.method).streamed
                and not (config.refit is not None and config.refit.sequential))
    changed: dict[int, dict[FFBlockRef, BlockShape]] = {}  # the compressed blocks' shapes, for counting
    tied_other = 0
    if streamed:
        overlap = sorted(drop & set(method_layers(m, ctx.num_layers)))
        if overlap:
            raise InputError(f"layers {overlap} are both dropped and compressed")
        errors: dict[str, list] | None = {"layers": [], "before": [], "after": []} if config.refit else None
        ov = Overlay(skip=drop)
        layers = _iter_layers(m, ctx)
        if "unrefit" in inputs:  # reuse its blocks: no re-clustering
            layers = _iter_overlay(inputs["unrefit"], ctx)
            _reuse_side_files(inputs["unrefit"], ctx)
        from tqdm import tqdm

        todo = len(method_layers(m, ctx.num_layers))
        for i, blocks in tqdm(layers, desc=f"compress {m.method}", unit="layer", total=todo, disable=todo < 2):
            one = Overlay(blocks={i: blocks})
            if config.refit is not None and errors is not None:
                for k, v in refit_overlay(one, ctx, config.refit).items():
                    errors[k] += v
            writer.add(i, one.blocks[i])
            changed[i] = {ref: BlockShape.of(ctx.family, ref, ff) for ref, ff in one.blocks[i].items()}
        if errors is not None and not errors["layers"]:
            errors = None
    else:
        # The same candidate built without refit: reuse it (no re-clustering). Merged MoE windows
        # are rebuilt (their expert matching is not stored with the overlay; it is cheap).
        if "unrefit" in inputs and not (isinstance(m, MergeMethod) and ctx.family.is_moe_layer(ctx.config, ctx.state(m.start))):
            ov = _load_overlay(inputs["unrefit"], ctx)
            _reuse_side_files(inputs["unrefit"], ctx)
        else:
            ov = _build(m, ctx)
        overlap = sorted(drop & set(ov.blocks))
        if overlap:
            raise InputError(f"layers {overlap} are both dropped and compressed")
        ov.skip |= drop
        errors = refit_overlay(ov, ctx, config.refit, inputs.get("data")) if config.refit is not None and ov.blocks else None
        group_of = {i: g for g in ov.tied for i in g}
        for i in sorted(ov.blocks):
            writer.add(i, ov.blocks[i], group_of.get(i), ov.extra.get(i))
        changed = {i: {ref: BlockShape.of(ctx.family, ref, ff) for ref, ff in b.items()} for i, b in ov.blocks.items()}
        # Tied non-FF tensors (a merged MoE router) are stored once too.
        tied_other = sum((len(g) - 1) * sum(t.numel() for t in ov.extra.get(g[0], {}).values()) for g in ov.tied)
        ov.extra = {}
        ov.blocks = {}
    # Every layer's blocks after compression, for parameter accounting.
    shapes = {i: list({**{ref: BlockShape.of(ctx.family, ref, ff) for ref, ff in ctx.shapes(i).items()},
                       **changed.get(i, {})}.values()) for i in range(ctx.num_layers)}
    shard_meta = json.loads((inputs["shard"] / "shard.json").read_text())
    counts = count_params(shard_meta["params"], shapes, ov.skip, ov.tied, tied_other=tied_other)
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
    result = {**counts, "changed_layers": sorted(set(changed) | ov.skip), "skipped": sorted(ov.skip), "tied": ov.tied,
              "tied_other": tied_other,
              # The changed layers' block shapes [config field, width, per neuron, constant]: the
              # planner recounts them with the export's width multiples.
              "shapes": {str(i): [[b.key, b.size, b.per_neuron, b.const] for b in shapes[i]] for i in sorted(changed)}}
    if errors is not None:
        result["refit_errors"] = errors
    return result

