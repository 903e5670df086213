"""export: a compressed model (base shard + overlay) -> a Hugging Face checkpoint directory.

``out_dir/model/`` holds ``config.json`` (new sizes), safetensors weights (sharded with an index
past ``max_shard_size``), the tokenizer files and a model card ``README.md``. It is written layer
by layer: one decoder layer and at most one output shard are in memory at a time.

Two forms:

- **stock** (``tied: false``, the default): loads with plain
  ``AutoModelForCausalLM.from_pretrained`` (``AutoModel`` for encoders), nothing of mlpfuse
  needed. Tensor names are what ``save_pretrained`` writes (transformers' own
  ``revert_weight_conversion``), so MoE experts are stored per expert
  (``block_sparse_moe.experts.E.w1.weight``, ``mlp.experts.E.gate_proj.weight``), the layout
  every loader (transformers, vLLM) reads. Tied windows are materialised as copies.
- **tied** (``tied: true``): each layer's FF blocks are stored at that layer's own widths (the
  experts of an MoE layer padded to its widest expert, aligned like the stock form's), so
  per-layer sizes save what they count; each tensor shared by a tied window (the layers whose
  overlay entries point at one patch file) is stored once, under the in-memory names of the
  window's first layer; ``mlpfuse_ties.json`` maps every other layer's tensor name to the stored one. The weights are named ``mlpfuse-tied*.safetensors`` on purpose:
  ``from_pretrained`` fails loudly on this directory instead of filling the missing tensors with
  random values. ``mlpfuse.load(path)`` builds the model from the config and re-ties: the layers of
  a window hold the very same ``nn.Parameter``.

Rules:

- Skipped layers are removed and the rest renumbered (``num_hidden_layers`` reduced; per-layer
  config lists such as ``layer_types`` sliced; index lists such as Qwen-MoE's
  ``mlp_only_layers`` remapped).
- Both forms store exactly what the planner counts for them (``stages/model/params.py``); the
  stage checks it and fails loudly otherwise.
- Stock configs have one FF size per kind of block (``intermediate_size``; MoE:
  ``moe_intermediate_size`` or ``intermediate_size`` for the experts,
  ``shared_expert_intermediate_size``). When layers differ, smaller blocks are **zero-padded** to
  the largest: padded neurons have zero up/gate rows (and zero up bias) and a zero down column, so
  their contribution ``down[:, i] * h_i`` is exactly 0 whatever ``act(0)`` is; the block's output
  is unchanged (up to float summation order). The padding's cost is reported as
  ``padded_params``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file
from torch import Tensor

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.model.families import FamilyAdapter, FFBlockRef, family_for
from mlpfuse.stages.model.hf import (
    STOCK_STEM,
    TIED_STEM,
    ExportError,
    copy_model_files,
    parse_size,
    revert_names,
    write_shards,
    write_ties_spec,
)
from mlpfuse.stages.model.overlay import read_overlay
from mlpfuse.stages.model.params import (
    BlockShape,
    count_params,
    export_multiples,
    layer_widths,
    stock_widths,
)
from mlpfuse.stages.model.shards import (
    DTYPES,
    build_skeleton,
    layer_file,
    load_shard_meta,
    stored_dtype,
    tensor_header,
)

MODEL_DIR = "model"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # False: stock checkpoint (tied windows as copies); True: compact form for mlpfuse.load.
    tied: bool = False
    # Storage dtype; "auto" keeps the base shard's.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Largest output shard ("2GB", "500MB", "1GiB", or bytes).
    max_shard_size: str = "2GB"
    # Expert FF sizes are zero-padded up to a multiple of this: transformers' default MoE kernel
    # (grouped_mm) needs 16-byte aligned strides and fails on e.g. 18 float32 columns. None: 16
    # bytes of the output dtype (float32: 4, bfloat16/float16: 8); 1: no alignment.
    moe_size_multiple: int | None = Field(None, ge=1)
    # The planner sizes pruned and fused FF blocks to multiples of this (None: 64 for the stock
    # export, 1 for the tied one), so quantization groups and tensor-parallel splits divide them;
    # the budget counts the rounding (the block keeps fewer neurons). 1: no rounding.
    multiple_of: int | None = Field(None, ge=1)
    # Method description for the model card; ``overlay/method.json`` is read when this is None.
    card: dict[str, Any] | None = None

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


# ----- reading the base and the overlay ----------------------------------------------------------


def _load(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


@dataclass
class _Layer:
    """What pass 1 learns about one base layer."""

    index: int
    skip: bool
    patch: str | None
    # FF block -> (size key, intermediate size before, after the overlay)
    blocks: dict[FFBlockRef, tuple[str, int, int]] = field(default_factory=dict)
    # The blocks' shapes after the overlay, for parameter counting.
    shapes: list[BlockShape] = field(default_factory=list)
    num_experts: int | None = None
    base_ff: int = 0
    new_ff: int = 0


def _ff_info(family: FamilyAdapter, config: Any, sd: dict[str, Tensor]) -> dict[FFBlockRef, BlockShape]:
    return {r: BlockShape.of(family, r, family.read_ff(config, sd, r)) for r in family.ff_blocks(config, sd)}


def pad_ff(ff: FFWeights, size: int) -> FFWeights:
    """``ff`` with zero neurons appended up to ``size``: zero up/gate rows, zero up bias, zero
    down columns. Each added neuron's contribution ``down[:, i] * h_i`` is exactly zero."""
    n = size - ff.intermediate_size
    if n < 0:
        raise ValueError(f"cannot pad an FF block of size {ff.intermediate_size} down to {size}")
    if n == 0:
        return ff

    def rows(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.cat([t, t.new_zeros((n, *t.shape[1:]))], 0)

    return replace(
        ff, up=rows(ff.up), gate=rows(ff.gate), b_up=rows(ff.b_up),  # type: ignore[arg-type]
        down=torch.cat([ff.down, ff.down.new_zeros((ff.down.shape[0], n))], 1),
    )


# ----- writing shards --------------------------------------------------------------------------


# ----- config ----------------------------------------------------------------------------------

# Config lists with one entry per decoder layer (sliced) and lists of layer indices (remapped).
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
LAYER_INDEX_LISTS = ("mlp_only_layers",)


def _new_config(hf_config: Any, family: FamilyAdapter, kept: list[int], sizes: dict[str, int],
                moe_flags: list[bool], dtype: torch.dtype) -> Any:
    import copy

    cfg = copy.deepcopy(hf_config)
    old_n = family.num_layers(cfg)
    setattr(cfg, family.num_layers_key, len(kept))
    for key in PER_LAYER_LISTS:
        v = getattr(cfg, key, None)
        if isinstance(v, (list, tuple)) and len(v) == old_n:
            setattr(cfg, key, [v[i] for i in kept])
    if hasattr(cfg, "mlp_only_layers") and family.moe is not None:
        # Which layers are dense follows from the tensors; say so explicitly, layer by layer.
        cfg.mlp_only_layers = [j for j, moe in enumerate(moe_flags) if not moe]
        if hasattr(cfg, "decoder_sparse_step"):
            cfg.decoder_sparse_step = 1
    for key, size in sizes.items():
        setattr(cfg, key, int(size))
    cfg.dtype = dtype
    return cfg


def _check_layer(skeleton_layer: torch.nn.Module, sd: dict[str, Tensor], j: int, narrower: bool = False) -> None:
    """Every tensor of exported layer ``j`` has its place and shape in the exported config's model
    (``narrower``: the tied form, where a layer's FF tensors may be narrower than the config's)."""
    expected = {n: tuple(p.shape) for n, p in skeleton_layer.named_parameters()}
    buffers = {n for n, _ in skeleton_layer.named_buffers()}
    got = {k: tuple(v.shape) for k, v in sd.items() if k not in buffers}

    def fits(k: str) -> bool:
        return got[k] == expected[k] or (narrower and len(got[k]) == len(expected[k])
                                          and all(g <= e for g, e in zip(got[k], expected[k])))

    wrong = sorted(set(got) ^ set(expected)) + sorted(k for k in set(got) & set(expected) if not fits(k))
    if wrong:
        detail = [f"{k}: {got.get(k)} vs {expected.get(k)}" for k in wrong[:4]]
        raise ExportError(f"exported layer {j} does not fit the exported config: {detail}")


# ----- the stage ---------------------------------------------------------------------------------


def _method_card(config: ExportConfig, overlay_dir: Path | None) -> dict | None:
    if config.card is not None:
        return dict(config.card)
    if overlay_dir is not None and (overlay_dir / "method.json").exists():
        return json.loads((overlay_dir / "method.json").read_text())
    return None


def run(config: ExportConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Write ``out_dir/model/``; returns parameter counts, sizes and the path."""
    from transformers import AutoConfig

    shard_dir = Path(inputs["shard"])
    overlay_dir = Path(inputs["overlay"]) if inputs.get("overlay") else None
    meta = load_shard_meta(shard_dir)
    hf_config = AutoConfig.from_pretrained(shard_dir)
    family = family_for(hf_config)
    n_layers = family.num_layers(hf_config)
    ov = read_overlay(overlay_dir)
    bad = sorted(i for i in ov.changed if not 0 <= i < n_layers)
    if bad:
        raise ExportError(f"overlay names layers {bad} but the model has {n_layers}")

    # Pass 1: headers only. FF sizes before/after every layer, hence the padding targets.
    infos: list[_Layer] = []
    for i in range(n_layers):
        info = _Layer(i, i in ov.skip, ov.patch_of.get(i))
        base = tensor_header(shard_dir / layer_file(i))
        before = _ff_info(family, hf_config, base)
        info.base_ff = sum(v.params for v in before.values())
        if not info.skip:
            new = dict(base)
            if info.patch:
                new.update(tensor_header(overlay_dir / info.patch))  # type: ignore[operator]
            after = _ff_info(family, hf_config, new)
            if set(after) != set(before):
                raise ExportError(f"layer {i}: the overlay changes which FF blocks the layer has")
            info.blocks = {r: (after[r].key, before[r].size, after[r].size) for r in after}
            info.shapes = list(after.values())
            info.new_ff = sum(v.params for v in after.values())
            if family.is_moe_layer(hf_config, new):
                assert family.moe is not None
                info.num_experts = int(new[f"{family.moe.path}.down_proj"].shape[0])
        infos.append(info)
    kept = [x for x in infos if not x.skip]
    if not kept:
        raise ExportError("the overlay skips every layer")
    if family.moe is not None:
        want = getattr(hf_config, family.moe.num_experts_key, None)
        counts = {x.num_experts for x in kept if x.num_experts is not None}
        if counts and counts != {want}:
            raise ExportError(f"expert counts {sorted(counts)} differ from the config's {want}; a stock "
                              "checkpoint needs the same experts in every layer")
    if config.dtype != "auto":
        out_dtype = DTYPES[config.dtype]
    else:
        out_dtype = stored_dtype(shard_dir)

    expert_key = family.moe.size_key if family.moe is not None and any(x.num_experts for x in kept) else None
    multiple = export_multiples(expert_key, out_dtype, config.moe_size_multiple)
    shapes = {x.index: x.shapes for x in kept}
    # The config's widths (the stock form pads every block to them); the tied form stores each
    # layer at its own widths (its experts padded to the layer's widest, aligned), loaded by
    # mlpfuse.load into the config's model with each layer's tensors as stored.
    targets = stock_widths(shapes, shapes, multiple)
    widths_of = {x.index: layer_widths(x.shapes, multiple) if config.tied else targets for x in kept}

    new_index = {x.index: j for j, x in enumerate(kept)}
    moe_flags = [x.num_experts is not None for x in kept]
    new_cfg = _new_config(hf_config, family, [x.index for x in kept], targets, moe_flags, out_dtype)

    model_dir = Path(out_dir) / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    new_cfg.save_pretrained(model_dir)
    # Re-read: what a user's from_pretrained will see (validates the edited config).
    new_cfg = AutoConfig.from_pretrained(model_dir)
    skeleton = build_skeleton(new_cfg)
    sk_layers = cast(torch.nn.ModuleList, skeleton.get_submodule(family.layers_path))
    skeleton.tie_weights()  # a tied head counts once, as from_pretrained's model counts it
    params = sum(p.numel() for p in skeleton.parameters())

    # Tied windows, in new indices: the kept layers that share one patch file (as the runner
    # shares one Patch between them); a skipped member drops out.
    by_patch: dict[str, list[int]] = {}
    for x in kept:
        if x.patch:
            by_patch.setdefault(x.patch, []).append(new_index[x.index])
    windows = [w for w in by_patch.values() if len(w) > 1]
    anchor_of = {m: w[0] for w in windows for m in w[1:]}

    ties: dict[str, str] = {}
    counted = {"padded": 0, "duplicated": 0, "duplicated_ff": 0}
    layers_report: list[dict[str, Any]] = []
    prefix = family.layers_path + ".{}."

    def groups() -> Iterator[dict[str, Tensor]]:
        """Each kept layer's tensors under their exported names, then the rest of the model."""
        for x in infos:
            if x.skip:
                layers_report.append({"layer": x.index, "skip": True, "ff_params_before": x.base_ff})
                continue
            yield _export_layer(x)
        rest = _load(shard_dir / "rest.safetensors")
        rest = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in rest.items()}
        yield rest if config.tied else revert_names(skeleton, rest)

    def _export_layer(x: _Layer) -> dict[str, Tensor]:
        j = new_index[x.index]
        sd = _load(shard_dir / layer_file(x.index))
        patch_keys: set[str] = set()
        if x.patch:
            # Read per layer (not cached): the stock form writes a tied window's tensors as copies.
            patch = _load(overlay_dir / x.patch)  # type: ignore[operator]
            sd.update(patch)
            patch_keys = set(patch)
            del patch
        blocks = {r: family.read_ff(hf_config, sd, r) for r in family.ff_blocks(hf_config, sd)}
        to = widths_of[x.index]
        if any(ff.intermediate_size < to[x.blocks[r][0]] for r, ff in blocks.items()):
            new_blocks = {r: pad_ff(ff, to[x.blocks[r][0]]) for r, ff in blocks.items()}
            layer_pad = sum(new_blocks[r].num_params() - blocks[r].num_params() for r in blocks)
            sd = family.write_ff(sd, new_blocks)
            blocks = new_blocks
        else:
            layer_pad = 0
        counted["padded"] += layer_pad
        layer_ff = sum(ff.num_params() for ff in blocks.values())
        del blocks
        sd = {k: (v.to(out_dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        _check_layer(sk_layers[j], sd, j, narrower=config.tied)
        shared = patch_keys if j in anchor_of else set()
        counted["duplicated"] += sum(sd[k].numel() for k in shared)
        counted["duplicated_ff"] += layer_ff if shared else 0  # a tied window shares every FF tensor
        layers_report.append({
            "layer": x.index, "exported_as": j, "patched": bool(x.patch),
            "tied_with": next((w for w in windows if j in w), None),
            "ff_sizes": {r.name: [b, a] for r, (_, b, a) in x.blocks.items()},
            "ff_params_before": x.base_ff, "ff_params_after": x.new_ff, "padded_params": layer_pad,
        })
        if config.tied:
            for k in sorted(shared):
                ties[prefix.format(j) + k] = prefix.format(anchor_of[j]) + k
            return {prefix.format(j) + k: v for k, v in sd.items() if k not in shared}
        return revert_names(skeleton, {prefix.format(j) + k: v for k, v in sd.items()})

    files, stored = write_shards(model_dir, TIED_STEM if config.tied else STOCK_STEM, groups(),
                                 total_parameters=params, max_bytes=parse_size(config.max_shard_size))
    if config.tied:
        write_ties_spec(model_dir, files, windows=windows, ties=ties)
    copy_model_files(shard_dir, model_dir)
    # What was written, counted by the planner's and compress's function: it must agree.
    skipped = {x.index for x in infos if x.skip}
    base_windows = [[kept[j].index for j in w] for w in windows]
    tied_other = counted["duplicated"] - counted["duplicated_ff"]  # a merged MoE window's router
    count = count_params(meta["params"], shapes, skipped, base_windows, tied_other=tied_other,
                         size_multiple=multiple)
    form = ("unique_params", "unique_padded_params") if config.tied else ("params", "padded_params")
    if (stored, counted["padded"]) != (count[form[0]], count[form[1]]) or (not config.tied and params != stored):
        raise RuntimeError(f"export stored {stored:,} parameters ({counted['padded']:,} padding) but counts "
                           f"{count}: a bug, please report it")
    duplicated = counted["duplicated"]

    base_params = int(meta["params"]["total"])
    base_ff = int(meta["params"]["ff"])
    tied_head = bool(meta.get("tied_head"))
    result = {
        "path": str(model_dir),
        "form": "tied" if config.tied else "stock",
        "files": files,
        "bytes": sum((model_dir / f).stat().st_size for f in files),
        "dtype": str(out_dtype).removeprefix("torch."),
        **count,
        "stored_params": stored,
        "duplicated_params": duplicated,
        "base_params": base_params,
        "base_ff_params": base_ff,
        "num_hidden_layers": len(kept),
        "base_num_hidden_layers": n_layers,
        "removed_layers": [x.index for x in infos if x.skip],
        "intermediate_size": _main_size(family, targets),
        "intermediate_sizes": targets,
        "tied_windows": windows,
        "tied_head": tied_head,
    }
    (model_dir / "README.md").write_text(model_card(meta, result, layers_report, _method_card(config, overlay_dir)))
    return result


def _main_size(family: FamilyAdapter, targets: dict[str, int]) -> int | None:
    for key in ((family.moe.size_key,) if family.moe is not None else ()) + (
            (family.dense.size_key,) if family.dense is not None else ()):
        if key in targets:
            return targets[key]
    return next(iter(targets.values()), None)


# ----- model card ----------------------------------------------------------------------------------


def _fmt(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def model_card(meta: dict, result: dict, layers: list[dict], method: dict | None) -> str:
    base = str(meta.get("model", "unknown"))
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    lines = ["---", "library_name: transformers", "tags:", "- mlpfuse", "- compressed"]
    if hub_like:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {base.split('/')[-1]}, FF layers compressed with mlpfuse", "",
              f"Base model: `{base}` ({meta.get('model_type')}, {result['base_num_hidden_layers']} layers).", ""]
    if method:
        lines += ["## Method", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in method.items()]
        lines.append("")
    lines += [
        "## Parameters", "",
        "| | base | exported |", "| --- | --- | --- |",
        f"| parameters (as loaded) | {_fmt(result['base_params'])} | {_fmt(result['params'])} |",
        f"| unique parameters (tied windows once) | {_fmt(result['base_params'])} | {_fmt(result['unique_params'])} |",
        f"| FF parameters | {_fmt(result['base_ff_params'])} | {_fmt(result['ff_params'])} |",
        f"| decoder layers | {result['base_num_hidden_layers']} | {result['num_hidden_layers']} |",
        f"| FF sizes | | {', '.join(f'{k}={v}' for k, v in result['intermediate_sizes'].items())} |",
        "",
    ]
    if result["padded_params"]:
        lines += [
            f"Stock configs allow one FF size per kind of block, so smaller FF blocks were zero-padded "
            f"to it: {_fmt(result['padded_params'])} of the parameters above are padding. Padded "
            "neurons have zero up/gate rows and a zero down column, so they add exactly nothing to the "
            "output.", "",
        ]
    if result["tied_windows"]:
        lines += [
            f"Tied windows (exported layer indices): {result['tied_windows']}. "
            + ("Each shared FF tensor is stored once (`mlpfuse_ties.json`)." if result["form"] == "tied"
               else f"They are stored as copies here ({_fmt(result['duplicated_params'])} duplicated "
                    "parameters); the tied export form stores them once."), "",
        ]
    lines += ["## Per-layer changes", "",
              "| base layer | exported as | change | FF sizes (before → after) | FF params (before → after) |",
              "| --- | --- | --- | --- | --- |"]
    for r in layers:
        if r.get("skip"):
            lines.append(f"| {r['layer']} | removed | layer dropped | | {_fmt(r['ff_params_before'])} → 0 |")
            continue
        change = []
        if r["patched"]:
            change.append("FF replaced")
        if r["tied_with"]:
            change.append(f"tied with {r['tied_with']}")
        if r["padded_params"]:
            change.append(f"zero-padded (+{r['padded_params']:,})")
        sizes = ", ".join(f"{n}: {b} → {a}" for n, (b, a) in list(r["ff_sizes"].items())[:4])
        if len(r["ff_sizes"]) > 4:
            sizes += f", … ({len(r['ff_sizes'])} blocks)"
        lines.append(f"| {r['layer']} | {r['exported_as']} | {'; '.join(change) or 'unchanged'} | {sizes} | "
                     f"{_fmt(r['ff_params_before'])} → {_fmt(r['ff_params_after'])} |")
    lines += ["", "## Loading", ""]
    if result["form"] == "tied":
        lines += ["This is the compact tied form: shared tensors are stored once, so it needs mlpfuse's loader,",
                  "which re-ties them (the layers of a window share the same parameters):", "",
                  "```python", "import mlpfuse", "model = mlpfuse.load(path)", "```", ""]
    else:
        lines += ["A stock checkpoint: no mlpfuse needed.", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(path)", "```", ""]
    return "\n".join(lines)


# ----- loading the tied form ---------------------------------------------------------------------


