"""Parameter counting: the one function the planner (before a candidate is built), compress (what
it built) and export (what it stores) count with.

A model's parameters are its non-FF parameters (per kept layer, and the rest: embeddings, norms,
head) plus its FF blocks'. Each FF block is counted from its shape alone (:class:`BlockShape`), so
a prediction from a candidate's settings and a count of written tensors go through the same sum.
The stock form pads every block to the widest block of its config field (one FF size per field,
rounded up to ``size_multiple`` where the export aligns it) and materialises tied windows; the
unique form stores each tied tensor once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.model.families import FamilyAdapter, FFBlockRef


def size_key(family: FamilyAdapter, ref: FFBlockRef) -> str:
    """The config field holding the width of block ``ref`` (``intermediate_size``,
    ``moe_intermediate_size``, ...): in the stock form every block of one field has one width."""
    if ref.kind == "dense":
        assert family.dense is not None
        return family.dense.size_key
    assert family.moe is not None
    if ref.kind == "shared":
        assert family.moe.shared is not None
        return family.moe.shared.size_key
    return family.moe.size_key


@dataclass(frozen=True)
class BlockShape:
    """What counting needs of one FF block: its config field, its width (intermediate neurons),
    the parameters each neuron carries (up, gate and down weights, up bias) and its constant part
    (the down bias)."""

    key: str
    size: int
    per_neuron: int
    const: int = 0

    @property
    def params(self) -> int:
        return self.size * self.per_neuron + self.const

    def resized(self, size: int) -> BlockShape:
        return replace(self, size=size)

    @classmethod
    def of(cls, family: FamilyAdapter, ref: FFBlockRef, ff: FFWeights) -> BlockShape:
        """The shape of block ``ff`` (real or meta tensors: only shapes are read)."""
        h = ff.hidden_size
        return cls(size_key(family, ref), ff.intermediate_size,
                   h * (3 if ff.is_glu else 2) + (1 if ff.b_up is not None else 0),
                   h if ff.b_down is not None else 0)


def stock_widths(blocks: Mapping[int, Sequence[BlockShape]], kept: Collection[int],
                 size_multiple: Mapping[str, int] | None = None) -> dict[str, int]:
    """The stock form's width per config field: the widest kept block, rounded up to its multiple."""
    widths: dict[str, int] = {}
    for i in kept:
        for b in blocks.get(i, ()):
            widths[b.key] = max(widths.get(b.key, 0), b.size)
    for key, mult in (size_multiple or {}).items():
        if key in widths and mult > 1:
            widths[key] = -(-widths[key] // mult) * mult
    return widths


def count_params(base: Mapping[str, Any], blocks: Mapping[int, Sequence[BlockShape]], skip: Collection[int],
                 tied: Sequence[Sequence[int]], *, tied_other: int = 0,
                 size_multiple: Mapping[str, int] | None = None, pad_unique: bool = False) -> dict[str, int]:
    """Parameters of a model whose layer ``i`` has FF blocks ``blocks[i]``.

    ``base``: the shard's counts (``shard.json`` ``params``: ``layers``, ``ff_layers``, ``rest``);
    ``skip``: layers removed; ``tied``: windows of layers sharing one set of FF tensors;
    ``tied_other``: non-FF parameters the windows also share beyond their first layer (a merged
    MoE router); ``pad_unique``: the unique form stores blocks padded too (as the tied export does).

    Returns ``params`` and ``ff_params`` (stock: padded, tied windows as copies),
    ``unique_params`` and ``unique_ff_params`` (each tied tensor once), ``padded_params``.
    """
    n = len(base["layers"])
    kept = [i for i in range(n) if i not in skip]
    non_ff = int(base["rest"]) + sum(int(base["layers"][i]) - int(base["ff_layers"][i]) for i in kept)
    widths = stock_widths(blocks, kept, size_multiple)

    def layer_ff(i: int, padded: bool) -> int:
        return sum((b.resized(widths[b.key]) if padded else b).params for b in blocks.get(i, ()))

    stock_ff = sum(layer_ff(i, True) for i in kept)
    own_ff = sum(layer_ff(i, False) for i in kept)
    group_of = {i: tuple(g) for g in tied for i in g}
    firsts = {group_of.get(i, (i,))[0] for i in kept}
    unique_ff = sum(layer_ff(i, pad_unique) for i in sorted(firsts))
    return {"params": non_ff + stock_ff, "unique_params": non_ff - tied_other + unique_ff,
            "ff_params": stock_ff, "unique_ff_params": unique_ff, "padded_params": stock_ff - own_ff}


def base_blocks(shard_dir: Path) -> tuple[dict[int, list[BlockShape]], set[int]]:
    """Every layer's FF block shapes in a shard (from the layer files' headers: no tensor is
    read), and which layers are MoE layers."""
    from mlpfuse.stages.model.runner import LayerStreamedModel

    model = LayerStreamedModel(shard_dir)
    blocks: dict[int, list[BlockShape]] = {}
    moe: set[int] = set()
    for i in range(model.num_layers):
        sd = model.layer_shapes(i)
        blocks[i] = [BlockShape.of(model.family, r, model.family.read_ff(model.config, sd, r))
                     for r in model.family.ff_blocks(model.config, sd)]
        if model.family.is_moe_layer(model.config, sd):
            moe.add(i)
    return blocks, moe
