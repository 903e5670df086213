"""The compression methods, as an explicit registry: name -> config class and build function.

A method is either per block (``build_block``: one FF block in, its compressed block out; the
compress stage streams these layer by layer) or whole-model (``build_model``: an overlay, for
methods that act across layers or remove them). The compress stage dispatches through
:data:`METHODS` and the planner enumerates it. A new method is a module here with its config and
build function, one entry below, and its config in the ``Method`` union (pydantic needs the union
spelled out to choose a config by its ``method:`` tag).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from mlpfuse.core.errors import InputError
from mlpfuse.stages.methods.base import BuildContext, MethodConfig, method_layers
from mlpfuse.stages.methods.drop import FFDropMethod, LayerDropMethod, drop_ff_block, drop_layers
from mlpfuse.stages.methods.fusion import FusionMethod, fuse_block
from mlpfuse.stages.methods.merge import MergeMethod, build_merge
from mlpfuse.stages.methods.moefy import MoefyMethod, moefy_block, moefy_width
from mlpfuse.stages.methods.prune import PruneMethod, prune_block, prune_sizes
from mlpfuse.stages.model.params import BlockShape


@dataclass(frozen=True)
class MethodDef:
    name: str
    config: type[MethodConfig]
    # Per-block methods: (config, ctx, layer, block ref, block, size or None) -> compressed block.
    build_block: Callable[..., Any] | None = None
    # Whole-model methods: (config, ctx) -> Overlay.
    build_model: Callable[..., Any] | None = None
    # Per-block sizes decided over all layers before the first block is built.
    sizes: Callable[[Any, BuildContext], dict] | None = None
    # Whether the least-squares refit applies (it needs surviving neurons to re-solve).
    refit: bool = True
    # The paper the method comes from ("" for a baseline).
    paper: str = ""
    # Per-block methods: the width a block of width I in layer i gets, known from the settings alone (None:
    # only the build decides, e.g. a sensitivity allocation), so the budget is checked before.
    width: Callable[[Any, int, int], int | None] | None = None

    @property
    def streamed(self) -> bool:
        return self.build_block is not None


METHODS: dict[str, MethodDef] = {
    d.name: d
    for d in (
        MethodDef("prune", PruneMethod, build_block=prune_block, sizes=prune_sizes,
                  width=lambda m, n, i: m.k(n, i) if m.allocation == "uniform" else None),
        MethodDef("fusion", FusionMethod, build_block=fuse_block, paper="MLP Fusion", width=lambda m, n, i: m.k(n)),
        MethodDef("moefy", MoefyMethod, build_block=moefy_block, paper="MLPMoE", width=moefy_width),
        MethodDef("merge", MergeMethod, build_model=build_merge, paper="FF merging"),
        MethodDef("layer_drop", LayerDropMethod, build_model=drop_layers, refit=False),
        MethodDef("ff_drop", FFDropMethod, build_block=drop_ff_block, width=lambda m, n, i: 0),
    )
}

#: A candidate's method settings: one of the registry's configs, chosen by ``method:``.
Method = Annotated[
    FusionMethod | PruneMethod | MergeMethod | LayerDropMethod | FFDropMethod | MoefyMethod,
    Field(discriminator="method"),
]


def method_def(name: str) -> MethodDef:
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; methods: {', '.join(METHODS)}") from None


def predict_shapes(candidate: Method, drop: Sequence[int], base: Mapping[int, Sequence[BlockShape]],
                   moe_layers: Collection[int]) -> tuple[dict[int, list[BlockShape]], set[int], list[list[int]]] | None:
    """The FF block shapes, removed layers and tied windows a candidate will have, from its
    settings and the base model's block shapes alone (no tensor read), or None where only the
    build can tell (a score-driven allocation, a merged MoE window's shared router)."""
    d = method_def(candidate.method)
    n = len(base)
    shapes = {i: list(base[i]) for i in range(n)}
    skip = {int(i) for i in drop}
    tied: list[list[int]] = []
    if d.build_block is not None:
        if d.width is None:
            return None
        for i in method_layers(candidate, n):
            new = [d.width(candidate, b.size, i) for b in shapes[i]]
            if any(w is None for w in new):
                return None
            shapes[i] = [b.resized(int(w)) for b, w in zip(shapes[i], new, strict=True)]  # type: ignore[arg-type]
    elif isinstance(candidate, LayerDropMethod):
        skip |= set(method_layers(candidate, n))
    elif isinstance(candidate, MergeMethod):
        window = list(range(candidate.start, candidate.start + candidate.size))
        if window[-1] >= n or any(i in moe_layers for i in window):
            return None
        tied = [window]
    else:
        return None
    return shapes, skip, tied
