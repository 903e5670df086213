"""A compressed model as an overlay on its base shards.

An overlay directory holds ``overlay.json`` and patch files: each patch is a safetensors file of
layer-relative FF tensors that replace the base layer's. Layers of a tied window point at the same
patch file, so a tied window is stored once on disk and held once in memory. Skipped layers are
dropped whole (identity). Nothing else of the base model is copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mlpfuse.core.artifacts import write_atomic, write_json_atomic
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.model.families import FamilyAdapter, FFBlockRef
from mlpfuse.stages.model.runner import SKIP, LayerOverride, Patch

OVERLAY = "overlay.json"


@dataclass
class Overlay:
    """Per-layer changes. ``blocks[i]`` replaces FF blocks of layer i; layers in one ``tied``
    group share their (identical) blocks; ``skip`` drops whole layers. ``extra[i]``: other
    layer-relative tensors of the FF sublayer that change with it (a merged MoE block's router);
    ``sources[i][ref]``: the original block of layer i that new block ``ref`` stands for, where
    it is another one (merged MoE experts matched across layers)."""

    blocks: dict[int, dict[FFBlockRef, FFWeights]] = field(default_factory=dict)
    skip: set[int] = field(default_factory=set)
    tied: list[list[int]] = field(default_factory=list)
    extra: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    sources: dict[int, dict[FFBlockRef, FFBlockRef]] = field(default_factory=dict)

    def changed_layers(self) -> list[int]:
        return sorted(set(self.blocks) | self.skip)


def ff_patch(family: FamilyAdapter, config: object, base: dict[str, Tensor], blocks: dict[FFBlockRef, FFWeights],
             *, every: bool = False) -> dict[str, Tensor]:
    """The tensors of ``base`` that the new blocks change (layer-relative keys); ``every``: every
    tensor the blocks write, changed or not (a tied window's patch replaces them in every layer,
    not only in the one it is compared with)."""
    new = family.write_ff(base, blocks)
    out = {}
    for k, v in new.items():
        b = base.get(k)
        if (b is None or (every and v is not b) or b.shape != v.shape or b.dtype != v.dtype
                or not torch.equal(b, v)):
            out[k] = v.contiguous()
    return out


class OverlayWriter:
    """Writes an overlay layer by layer (each patch as soon as its layer is built, so a stage
    holds one compressed layer at a time), then ``overlay.json`` last."""

    def __init__(self, out_dir: Path, family: FamilyAdapter | None = None, config: object = None,
                 base_state: Callable[[int], dict[str, Tensor]] | None = None, dtype: torch.dtype | None = None):
        self.out_dir, self.family, self.config, self.base_state, self.dtype = out_dir, family, config, base_state, dtype
        self.layers: dict[str, dict] = {}
        self.written: dict[tuple[int, ...], str] = {}

    def add(self, i: int, blocks: dict[FFBlockRef, FFWeights], group: list[int] | None = None,
            extra: dict[str, Tensor] | None = None) -> None:
        """Layer ``i``'s new blocks and ``extra`` tensors (``group``: the tied window it belongs
        to, stored once)."""
        def patch(g: tuple[int, ...]) -> dict[str, Tensor]:
            assert self.family is not None and self.base_state is not None
            p = ff_patch(self.family, self.config, self.base_state(i), blocks, every=len(g) > 1)
            p.update({k: v.contiguous() for k, v in (extra or {}).items()})
            if self.dtype is not None:
                p = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in p.items()}
            return p

        self.add_patch(i, tuple(group or [i]), patch)

    def add_patch(self, i: int, group: tuple[int, ...],
                  make: Callable[[tuple[int, ...]], dict[str, Tensor]]) -> None:
        """Layer ``i`` takes the patch of its tied ``group`` (``(i,)`` when untied): ``make(group)``
        is called, and its tensors written atomically, once per group."""
        g = group
        if g not in self.written:
            patch = make(g)
            name = f"ff/L{g[0]:05d}" + (f"-{g[-1]:05d}" if len(g) > 1 else "") + ".safetensors"
            write_atomic(self.out_dir / name, lambda p: save_file(patch, str(p)))
            self.written[g] = name
        self.layers[str(i)] = {"patch": self.written[g], "tied": list(g) if len(g) > 1 else None}

    def finish(self, skip: set[int], tied: list[list[int]]) -> dict:
        layers = {**{str(i): {"skip": True} for i in sorted(skip)}, **self.layers}
        meta = {"layers": layers, "tied": [list(g) for g in tied]}
        write_json_atomic(self.out_dir / OVERLAY, meta)
        return meta


def save_overlay(out_dir: Path, overlay: Overlay, family: FamilyAdapter, config: object,
                 base_state: Callable[[int], dict[str, Tensor]], dtype: torch.dtype | None = None) -> dict:
    """Write the overlay's patch files and ``overlay.json``; returns the JSON."""
    writer = OverlayWriter(out_dir, family, config, base_state, dtype)
    group_of = {i: g for g in overlay.tied for i in g}
    for i in sorted(overlay.blocks):
        writer.add(i, overlay.blocks[i], group_of.get(i), overlay.extra.get(i))
    return writer.finish(overlay.skip, overlay.tied)


@dataclass(frozen=True)
class OverlayMeta:
    """An overlay as written (``overlay.json``): the one reader every stage goes through."""

    dir: Path | None
    skip: frozenset[int] = frozenset()
    patch_of: dict[int, str] = field(default_factory=dict)  # layer -> its patch file (shared in a window)
    tied: list[list[int]] = field(default_factory=list)

    @property
    def changed(self) -> list[int]:
        """Every layer the overlay changes (skipped or patched), in order."""
        return sorted(self.skip | set(self.patch_of))

    def group_of(self, i: int) -> tuple[int, ...]:
        """The tied window layer ``i`` belongs to, or ``(i,)``."""
        return next((tuple(g) for g in self.tied if i in g), (i,))

    def patch(self, i: int) -> dict[str, Tensor]:
        """Layer ``i``'s patch tensors, read now."""
        assert self.dir is not None
        return load_file(str(self.dir / self.patch_of[i]))

    def iter_states(self, base_state: Callable[[int], dict[str, Tensor]]) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(layer, its base state with the patch applied) for every patched layer, in order; a
        tied window's patch is read once for its consecutive layers, one patch resident."""
        held: tuple[str, dict[str, Tensor]] | None = None
        for i in sorted(self.patch_of):
            name = self.patch_of[i]
            if held is None or held[0] != name:
                held = (name, self.patch(i))
            yield i, {**base_state(i), **held[1]}


def read_overlay(overlay_dir: Path | None) -> OverlayMeta:
    """The overlay at ``overlay_dir`` (None: the base model, nothing changed)."""
    if overlay_dir is None:
        return OverlayMeta(None)
    meta = json.loads((overlay_dir / OVERLAY).read_text())
    layers = {int(i): e for i, e in meta.get("layers", {}).items()}
    return OverlayMeta(overlay_dir, frozenset(i for i, e in layers.items() if e.get("skip")),
                       {i: e["patch"] for i, e in layers.items() if e.get("patch")},
                       [list(g) for g in meta.get("tied", [])])


def load_overrides(overlay_dir: Path | None) -> dict[int, LayerOverride]:
    """The runner's layer overrides for an overlay directory (tied layers share tensors)."""
    meta = read_overlay(overlay_dir)
    assert overlay_dir is not None or not meta.patch_of
    cache: dict[str, Patch] = {}
    out: dict[int, LayerOverride] = dict.fromkeys(meta.skip, SKIP)
    for i, name in meta.patch_of.items():
        if name not in cache:
            cache[name] = Patch(PatchFile(overlay_dir / name))  # type: ignore[operator]
        out[i] = cache[name]
    return out


class PatchFile(Mapping[str, Tensor]):
    """A patch file's tensors, read when the runner materialises the layer (not when the overlay
    is opened), so a candidate's evaluation holds one layer's patch at a time."""

    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def first_changed_layer(overlay_dir: Path | None) -> int | None:
    return next(iter(read_overlay(overlay_dir).changed), None)
