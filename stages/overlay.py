"""A compressed model as an overlay on its base shards.

An overlay directory holds ``overlay.json`` and patch files: each patch is a safetensors file of
layer-relative FF tensors that replace the base layer's. Layers of a tied window point at the same
patch file, so a tied window is stored once on disk and held once in memory. Skipped layers are
dropped whole (identity). Nothing else of the base model is copied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from stages.artifacts import write_atomic, write_json_atomic
from stages.families import FamilyAdapter, FFBlockRef, FFWeights
from stages.runner import SKIP, LayerOverride, Patch

OVERLAY = "overlay.json"


@dataclass
class Overlay:
    """Per-layer changes. ``blocks[i]`` replaces FF blocks of layer i; layers in one ``tied``
    group share their (identical) blocks; ``skip`` drops whole layers."""

    blocks: dict[int, dict[FFBlockRef, FFWeights]] = field(default_factory=dict)
    skip: set[int] = field(default_factory=set)
    tied: list[list[int]] = field(default_factory=list)

    def changed_layers(self) -> list[int]:
        return sorted(set(self.blocks) | self.skip)


def ff_patch(family: FamilyAdapter, config: object, base: dict[str, Tensor], blocks: dict[FFBlockRef, FFWeights]) -> dict[str, Tensor]:
    """Only the tensors of ``base`` that the new blocks change (layer-relative keys)."""
    new = family.write_ff(base, blocks)
    out = {}
    for k, v in new.items():
        b = base.get(k)
        if b is None or b.shape != v.shape or b.dtype != v.dtype or not torch.equal(b, v):
            out[k] = v.contiguous()
    return out


def save_overlay(out_dir: Path, overlay: Overlay, family: FamilyAdapter, config: object,
                 base_state: "callable", dtype: torch.dtype | None = None) -> dict:
    """Write the overlay's patch files and ``overlay.json``; returns the JSON."""
    layers: dict[str, dict] = {str(i): {"skip": True} for i in sorted(overlay.skip)}
    group_of = {i: g for g in overlay.tied for i in g}
    written: dict[tuple[int, ...], str] = {}
    for i in sorted(overlay.blocks):
        group = tuple(group_of.get(i, [i]))
        if group not in written:
            patch = ff_patch(family, config, base_state(i), overlay.blocks[i])
            if dtype is not None:
                patch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in patch.items()}
            name = f"ff/L{group[0]:05d}" + (f"-{group[-1]:05d}" if len(group) > 1 else "") + ".safetensors"
            write_atomic(out_dir / name, lambda p, t=patch: save_file(t, str(p)))
            written[group] = name
        layers[str(i)] = {"patch": written[group], "tied": list(group) if len(group) > 1 else None}
    meta = {"layers": layers, "tied": [list(g) for g in overlay.tied]}
    write_json_atomic(out_dir / OVERLAY, meta)
    return meta


def load_overrides(overlay_dir: Path | None) -> dict[int, LayerOverride]:
    """The runner's layer overrides for an overlay directory (tied layers share tensors)."""
    if overlay_dir is None:
        return {}
    meta = json.loads((overlay_dir / OVERLAY).read_text())
    cache: dict[str, Patch] = {}
    out: dict[int, LayerOverride] = {}
    for i, entry in meta["layers"].items():
        if entry.get("skip"):
            out[int(i)] = SKIP
        else:
            name = entry["patch"]
            if name not in cache:
                cache[name] = Patch(load_file(str(overlay_dir / name)))
            out[int(i)] = cache[name]
    return out


def first_changed_layer(overlay_dir: Path | None) -> int | None:
    if overlay_dir is None:
        return None
    layers = json.loads((overlay_dir / OVERLAY).read_text())["layers"]
    return min((int(i) for i in layers), default=None)
