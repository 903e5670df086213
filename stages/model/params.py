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

import torch

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


def _round_up(n: int, mult: int) -> int:
    return -(-n // mult) * mult if mult > 1 else n


def stock_widths(blocks: Mapping[int, Sequence[BlockShape]], kept: Collection[int],
                 size_multiple: Mapping[str, int] | None = None) -> dict[str, int]:
    """The stock form's width per config field: the widest kept block, rounded up to its multiple."""
    widths: dict[str, int] = {}
    for i in kept:
        for b in blocks.get(i, ()):
            widths[b.key] = max(widths.get(b.key, 0), b.size)
    return {k: _round_up(w, (size_multiple or {}).get(k, 1)) for k, w in widths.items()}


def layer_widths(blocks: Sequence[BlockShape], size_multiple: Mapping[str, int] | None = None) -> dict[str, int]:
    """The tied form's widths for one layer: per config field its widest block in this layer (the
    experts of a layer share one fused tensor), rounded up to the field's multiple."""
    return stock_widths({0: blocks}, [0], size_multiple)


def export_multiples(expert_key: str | None, dtype: torch.dtype, moe_size_multiple: int | None = None) -> dict[str, int]:
    """The width multiple the export aligns each config field to: routed experts to 16 bytes of
    the stored dtype (transformers' grouped_mm kernel needs 16-byte aligned strides), or
    ``moe_size_multiple`` when given; other blocks are stored at their width."""
    if expert_key is None:
        return {}
    return {expert_key: moe_size_multiple or max(1, 16 // torch.empty(0, dtype=dtype).element_size())}


def count_params(base: Mapping[str, Any], blocks: Mapping[int, Sequence[BlockShape]], skip: Collection[int],
                 tied: Sequence[Sequence[int]], *, tied_other: int = 0,
                 size_multiple: Mapping[str, int] | None = None) -> dict[str, int]:
    """Parameters of a model whose layer ``i`` has FF blocks ``blocks[i]``, as each export form
    stores it.

    ``base``: the shard's counts (``shard.json`` ``params``: ``layers``, ``ff_layers``, ``rest``);
    ``skip``: layers removed; ``tied``: windows of layers sharing one set of FF tensors;
    ``tied_other``: non-FF parameters the windows also share beyond their first layer (a merged
    MoE router); ``size_multiple``: the width multiple per config field (:func:`export_multiples`).

    Returns ``params`` and ``ff_params``: the stock form (one width per config field, every block
    zero-padded to it, tied windows as copies), ``padded_params`` its padding; ``unique_params``
    and ``unique_ff_params``: the tied form (each layer at its own widths, each tied tensor once),
    ``unique_padded_params`` its padding (experts of a layer padded to its widest, alignment).
    """
    n = len(base["layers"])
    kept = [i for i in range(n) if i not in skip]
    non_ff = int(base["rest"]) + sum(int(base["layers"][i]) - int(base["ff_layers"][i]) for i in kept)
    widths = stock_widths(blocks, kept, size_multiple)

    def layer_ff(i: int, to: Mapping[str, int] | None) -> int:
        return sum((b.resized(to[b.key]) if to is not None else b).params for b in blocks.get(i, ()))

    stock_ff = sum(layer_ff(i, widths) for i in kept)
    own_ff = sum(layer_ff(i, None) for i in kept)
    group_of = {i: tuple(g) for g in tied for i in g}
    firsts = sorted({group_of.get(i, (i,))[0] for i in kept})
    unique_ff = sum(layer_ff(i, layer_widths(blocks.get(i, ()), size_multiple)) for i in firsts)
    unique_own = sum(layer_ff(i, None) for i in firsts)
    return {"params": non_ff + stock_ff, "unique_params": non_ff - tied_other + unique_ff,
            "ff_params": stock_ff, "unique_ff_params": unique_ff, "padded_params": stock_ff - own_ff,
            "unique_padded_params": unique_ff - unique_own}


@dataclass(frozen=True)
class BaseShapes:
    """A shard's FF block shapes per layer, its MoE layers, its routed experts' config field (None
    for a dense model) and its stored precision: what sizing a candidate needs, from headers."""

    blocks: dict[int, list[BlockShape]]
    moe_layers: set[int]
    expert_key: str | None
    dtype: torch.dtype

    def multiples(self, moe_size_multiple: int | None = None, dtype: torch.dtype | None = None) -> dict[str, int]:
        """The export's width multiples for this model (:func:`export_multiples`)."""
        return export_multiples(self.expert_key if self.moe_layers else None, dtype or self.dtype, moe_size_multiple)


def base_blocks(shard_dir: Path) -> BaseShapes:
    """Every layer's FF block shapes in a shard (from the layer files' headers: no tensor is
    read), which layers are MoE layers, and what else sizing needs (:class:`BaseShapes`)."""
    from mlpfuse.stages.model.runner import LayerStreamedModel
    from mlpfuse.stages.model.shards import stored_dtype

    model = LayerStreamedModel(shard_dir)
    blocks: dict[int, list[BlockShape]] = {}
    moe: set[int] = set()
    for i in range(model.num_layers):
        sd = model.layer_shapes(i)
        blocks[i] = [BlockShape.of(model.family, r, model.family.read_ff(model.config, sd, r))
                     for r in model.family.ff_blocks(model.config, sd)]
        if model.family.is_moe_layer(model.config, sd):
            moe.add(i)
    expert_key = model.family.moe.size_key if model.family.moe is not None else None
    return BaseShapes(blocks, moe, expert_key, stored_dtype(shard_dir))


def recount(base: Mapping[str, Any], shapes: BaseShapes, result: Mapping[str, Any],
            size_multiple: Mapping[str, int] | None = None) -> dict[str, int]:
    """A compress result's counts again, for the export's width multiples: the base blocks with
    the candidate's changed layers (``result["shapes"]``), its removed layers and tied windows."""
    blocks = {**shapes.blocks, **{int(i): [BlockShape(*b) for b in v] for i, v in result["shapes"].items()}}
    return count_params(base, blocks, set(result["skipped"]), result["tied"],
                        tied_other=int(result.get("tied_other", 0)), size_multiple=size_multiple)
