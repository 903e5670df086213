"""Model families: where each decoder layer's feed-forward weights live and how they are shaped.

Every stage that touches FF weights goes through an adapter, so the methods work on one neutral
layout, :class:`FFWeights`, whatever the architecture stores. Adapters work on a *layer state
dict* whose keys are relative to the decoder layer (``mlp.up_proj.weight``) and in the layout
that the transformers modeling code holds in memory (for transformers 5 MoE models: fused expert
tensors ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]).
Checkpoints saved in the older per-expert layout are converted once, by :meth:`canonicalize`,
when the shard stage writes the layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mlpfuse.core.errors import UnsupportedModelError
from mlpfuse.stages.math.ffweights import FFWeights


@dataclass(frozen=True)
class FFBlockRef:
    """Names one FF block of a layer: ``kind`` is "dense", "expert" or "shared"."""

    kind: str
    expert: int | None = None

    @property
    def name(self) -> str:
        return {"dense": "mlp", "shared": "shared"}.get(self.kind, f"expert{self.expert}")


@dataclass(frozen=True)
class DenseFF:
    """Where a dense MLP's tensors are, relative to the layer (``{}`` is replaced by weight/bias)."""

    up: str
    down: str
    gate: str | None = None
    conv1d: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    bias: bool = False
    # Parameter-count key in the config, for reporting and exporting a smaller size.
    size_key: str = "intermediate_size"

    def read(self, sd: dict[str, Tensor], act: str, prefix: str = "") -> FFWeights:
        def w(name: str) -> Tensor:
            t = sd[prefix + name.format("weight")]
            return t.t() if self.conv1d else t

        def b(name: str) -> Tensor | None:
            return sd.get(prefix + name.format("bias")) if self.bias else None

        return FFWeights(
            up=w(self.up), down=w(self.down), act=act,
            gate=None if self.gate is None else w(self.gate),
            b_up=b(self.up), b_down=b(self.down),
        )

    def write(self, sd: dict[str, Tensor], ff: FFWeights, prefix: str = "") -> None:
        def put(name: str, t: Tensor) -> None:
            sd[prefix + name.format("weight")] = (t.t() if self.conv1d else t).contiguous()

        put(self.up, ff.up)
        put(self.down, ff.down)
        if self.gate is not None:
            if ff.gate is None:
                raise ValueError("a GLU block needs gate weights")
            put(self.gate, ff.gate)
        if self.bias:
            if ff.b_up is not None:
                sd[prefix + self.up.format("bias")] = ff.b_up.contiguous()
            if ff.b_down is not None:
                sd[prefix + self.down.format("bias")] = ff.b_down.contiguous()


@dataclass(frozen=True)
class FusedExperts:
    """transformers 5 fused expert tensors: ``gate_up_proj`` [E, 2I, H] (gate rows first),
    ``down_proj`` [E, H, I], plus the router, and an optional dense shared expert."""

    path: str = "mlp.experts"
    router: str = "mlp.gate.weight"
    # The router module returns (logits [n, E], top-k weights [n, k], top-k expert ids [n, k]).
    router_module: str = "mlp.gate"
    shared: DenseFF | None = None
    size_key: str = "intermediate_size"
    num_experts_key: str = "num_local_experts"
    # Legacy per-expert checkpoint layout (one regex with the expert index as group 1) -> proj role.
    legacy: tuple[tuple[str, str], ...] = ()
    legacy_router: str | None = None

    def read(self, sd: dict[str, Tensor], e: int, act: str) -> FFWeights:
        gate_up = sd[f"{self.path}.gate_up_proj"][e]
        gate, up = gate_up.chunk(2, dim=0)
        return FFWeights(up=up, gate=gate, down=sd[f"{self.path}.down_proj"][e], act=act)

    def write_all(self, sd: dict[str, Tensor], experts: list[FFWeights]) -> None:
        sizes = {ff.intermediate_size for ff in experts}
        if len(sizes) != 1:
            raise ValueError(f"fused expert tensors need one intermediate size for all experts, got {sorted(sizes)}")
        # Filled expert by expert: no per-expert concatenations beside the fused tensor.
        n, h = sizes.pop(), experts[0].hidden_size
        dtype = torch.promote_types(experts[0].up.dtype, experts[0].down.dtype)
        dev = experts[0].up.device
        gate_up = torch.empty((len(experts), 2 * n, h), dtype=dtype, device=dev)
        down = torch.empty((len(experts), h, n), dtype=dtype, device=dev)
        for e, ff in enumerate(experts):
            assert ff.gate is not None
            gate_up[e, :n], gate_up[e, n:], down[e] = ff.gate, ff.up, ff.down
        sd[f"{self.path}.gate_up_proj"], sd[f"{self.path}.down_proj"] = gate_up, down


@dataclass(frozen=True)
class FamilyAdapter:
    """What mlpfuse needs to know about one architecture family."""

    name: str
    model_types: tuple[str, ...]
    # Attribute path of the decoder-layer ModuleList inside the *task* model (ForCausalLM / base).
    layers_path: str
    # Checkpoint key prefixes of layer i, tried in order (task model first, then base model).
    layer_prefixes: tuple[str, ...]
    dense: DenseFF | None = None
    moe: FusedExperts | None = None
    act_key: str = "hidden_act"
    num_layers_key: str = "num_hidden_layers"
    causal: bool = True
    # Module path of the FF block inside a layer, for hooks (collect) and replacement (fuse).
    ff_module: str = "mlp"
    renames: tuple[tuple[str, str], ...] = field(default=())

    def act(self, config: Any) -> str:
        # Gemma 1 names it hidden_act, Gemma 2/3 hidden_activation.
        act = getattr(config, self.act_key, None) or getattr(config, "hidden_act", None)
        if act is None:
            raise UnsupportedModelError(f"{self.name}: config has no activation ({self.act_key})")
        return str(act)

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.num_layers_key))

    def is_moe_layer(self, config: Any, layer_sd: dict[str, Tensor]) -> bool:
        return self.moe is not None and f"{self.moe.path}.down_proj" in layer_sd

    def ff_blocks(self, config: Any, layer_sd: dict[str, Tensor]) -> list[FFBlockRef]:
        """The FF blocks of one layer (dense: one; MoE: each expert, then the shared expert)."""
        if self.is_moe_layer(config, layer_sd):
            assert self.moe is not None
            n = int(layer_sd[f"{self.moe.path}.down_proj"].shape[0])
            refs = [FFBlockRef("expert", e) for e in range(n)]
            if self.moe.shared is not None:
                refs.append(FFBlockRef("shared"))
            return refs
        if self.dense is None:
            raise UnsupportedModelError(f"{self.name}: layer has no dense MLP and no experts")
        return [FFBlockRef("dense")]

    def read_ff(self, config: Any, layer_sd: dict[str, Tensor], ref: FFBlockRef) -> FFWeights:
        act = self.act(config)
        if ref.kind == "expert":
            assert self.moe is not None and ref.expert is not None
            return self.moe.read(layer_sd, ref.expert, act)
        if ref.kind == "shared":
            assert self.moe is not None and self.moe.shared is not None
            return self.moe.shared.read(layer_sd, act)
        assert self.dense is not None
        return self.dense.read(layer_sd, act)

    def write_ff(self, layer_sd: dict[str, Tensor], blocks: dict[FFBlockRef, FFWeights]) -> dict[str, Tensor]:
        """A new layer state dict with ``blocks`` replaced (experts: all of them at once)."""
        sd = dict(layer_sd)
        experts = sorted((r for r in blocks if r.kind == "expert"), key=lambda r: r.expert or 0)
        if experts:
            assert self.moe is not None
            n = int(layer_sd[f"{self.moe.path}.down_proj"].shape[0])
            if [r.expert for r in experts] != list(range(n)):
                raise ValueError("fused expert tensors are written for all experts of a layer at once")
            self.moe.write_all(sd, [blocks[r] for r in experts])
        for ref, ff in blocks.items():
            if ref.kind == "shared":
                assert self.moe is not None and self.moe.shared is not None
                self.moe.shared.write(sd, ff)
            elif ref.kind == "dense":
                assert self.dense is not None
                self.dense.write(sd, ff)
        return sd

    def renamed(self, layer_sd: dict[str, Any]) -> dict[str, Any]:
        """Old layer key names -> current ones (values untouched)."""
        sd = dict(layer_sd)
        for old, new in self.renames:
            for k in [k for k in sd if k.startswith(old)]:
                sd[new + k[len(old):]] = sd.pop(k)
        return sd

    def legacy_experts(self, keys: Iterable[str]) -> dict[str, list[tuple[str, ...]]]:
        """For a layer in the legacy per-expert MoE layout (keys after :meth:`renamed`): each fused
        tensor's key -> per expert, the keys whose dim-0 concatenation is that expert's slice
        (``gate_up_proj[e] = cat(gate_e, up_e)``, ``down_proj[e] = down_e``). Empty otherwise."""
        moe = self.moe
        if moe is None or not moe.legacy:
            return {}
        roles: dict[str, dict[int, str]] = {}
        for k in keys:
            for pattern, role in moe.legacy:
                m = re.fullmatch(pattern, k)
                if m:
                    roles.setdefault(role, {})[int(m.group(1))] = k
                    break
        if not roles:
            return {}
        n = len(roles["down"])
        return {f"{moe.path}.gate_up_proj": [(roles["gate"][e], roles["up"][e]) for e in range(n)],
                f"{moe.path}.down_proj": [(roles["down"][e],) for e in range(n)]}

    def canonicalize(self, layer_sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Checkpoint-layout layer tensors -> the in-memory layout (legacy per-expert MoE keys
        are stacked into the fused tensors; old names renamed)."""
        sd = self.renamed(layer_sd)
        fused = self.legacy_experts(list(sd))
        for key, groups in fused.items():
            sd[key] = torch.stack([torch.cat([sd[k] for k in g], 0) for g in groups])
        for k in {k for groups in fused.values() for g in groups for k in g}:
            del sd[k]
        moe = self.moe
        if moe is not None and moe.legacy and moe.legacy_router and moe.legacy_router in sd:
            sd[moe.router] = sd.pop(moe.legacy_router)
        return sd


_SWIGLU = DenseFF(up="mlp.up_proj.{}", gate="mlp.gate_proj.{}", down="mlp.down_proj.{}")
_QWEN_LEGACY = (
    (r"mlp\.experts\.(\d+)\.gate_proj\.weight", "gate"),
    (r"mlp\.experts\.(\d+)\.up_proj\.weight", "up"),
    (r"mlp\.experts\.(\d+)\.down_proj\.weight", "down"),
)

# Explicit registry: model_type -> adapter. Add a family here, nowhere else.
_ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(
        name="gpt2", model_types=("gpt2",), layers_path="transformer.h",
        layer_prefixes=("transformer.h.{}.", "h.{}."),
        dense=DenseFF(up="mlp.c_fc.{}", down="mlp.c_proj.{}", conv1d=True, bias=True, size_key="n_inner"),
        act_key="activation_function", num_layers_key="n_layer",
    ),
    FamilyAdapter(
        name="bert", model_types=("bert", "roberta"), layers_path="encoder.layer",
        layer_prefixes=("bert.encoder.layer.{}.", "roberta.encoder.layer.{}.", "encoder.layer.{}."),
        dense=DenseFF(up="intermediate.dense.{}", down="output.dense.{}", bias=True),
        causal=False, ff_module="intermediate",
    ),
    FamilyAdapter(
        name="opt", model_types=("opt",), layers_path="model.decoder.layers",
        layer_prefixes=("model.decoder.layers.{}.", "decoder.layers.{}."),
        dense=DenseFF(up="fc1.{}", down="fc2.{}", bias=True, size_key="ffn_dim"),
        act_key="activation_function", ff_module="fc1",
    ),
    FamilyAdapter(
        name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), layers_path="model.layers",
        layer_prefixes=("model.layers.{}.",), dense=_SWIGLU,
    ),
    FamilyAdapter(
        name="gemma", model_types=("gemma", "gemma2", "gemma3_text"), layers_path="model.layers",
        layer_prefixes=("model.layers.{}.", "language_model.model.layers.{}."), dense=_SWIGLU,
        act_key="hidden_activation",
    ),
    FamilyAdapter(
        name="mixtral", model_types=("mixtral",), layers_path="model.layers",
        layer_prefixes=("model.layers.{}.",),
        moe=FusedExperts(
            legacy=(
                (r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", "gate"),
                (r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", "up"),
                (r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", "down"),
            ),
            legacy_router="block_sparse_moe.gate.weight",
        ),
    ),
    FamilyAdapter(
        name="qwen2_moe", model_types=("qwen2_moe",), layers_path="model.layers",
        layer_prefixes=("model.layers.{}.",), dense=_SWIGLU,
        moe=FusedExperts(
            shared=DenseFF(
                up="mlp.shared_expert.up_proj.{}", gate="mlp.shared_expert.gate_proj.{}",
                down="mlp.shared_expert.down_proj.{}", size_key="shared_expert_intermediate_size",
            ),
            size_key="moe_intermediate_size", num_experts_key="num_experts", legacy=_QWEN_LEGACY,
        ),
    ),
    FamilyAdapter(
        name="qwen3_moe", model_types=("qwen3_moe",), layers_path="model.layers",
        layer_prefixes=("model.layers.{}.",), dense=_SWIGLU,
        moe=FusedExperts(size_key="moe_intermediate_size", num_experts_key="num_experts", legacy=_QWEN_LEGACY),
    ),
)
FAMILIES: dict[str, FamilyAdapter] = {t: a for a in _ADAPTERS for t in a.model_types}


def family_for(config: Any) -> FamilyAdapter:
    """The adapter for a transformers config; a clear error naming the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]  # type: ignore[index]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def sync_conv1d_widths(module: torch.nn.Module) -> None:
    """GPT-2's ``Conv1D`` reshapes its output by the width it was built with (``nf``): after its
    weight is replaced by one of another width (a compressed FF block), follow the weight."""
    for sub in module.modules():
        if type(sub).__name__ == "Conv1D" and sub.get_parameter("weight").device.type != "meta":
            setattr(sub, "nf", sub.get_parameter("weight").shape[1])  # noqa: B010
