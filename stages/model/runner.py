"""The layer-streamed runner: token blocks through a sharded model one decoder layer at a time.

The task model is built as a skeleton (parameters on the meta device, real buffers); only the
non-layer weights (embeddings, final norm, head) are loaded. Each decoder layer is materialised
from its shard file, applied to every batch, and released before the next is loaded, so one
layer is resident at a time (llm-compressor's sequential onloading).

Family quirks (attention masks, rotary/position embeddings, per-layer sliding windows) are not
re-implemented: the model's own forward runs once with *recorder* modules in place of the layers,
which capture exactly the arguments each layer would receive; after the last layer, the model's
forward runs again with an *injector* in place of layer 0 that returns the streamed hidden state,
so the model's own final norm and head produce the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from mlpfuse.core.compute import current_compute
from mlpfuse.stages.model.families import FamilyAdapter, family_for, sync_conv1d_widths
from mlpfuse.stages.model.shards import (
    build_skeleton,
    layer_file,
    load_shard_meta,
    stored_dtype,
    tensor_header,
)

# A layer override: SKIP drops the whole decoder layer (identity); a Patch replaces some of the
# layer's tensors (a compressed FF block) on top of the shard; a plain mapping replaces them all.
SKIP = object()


@dataclass(frozen=True)
class Patch:
    """Tensors (layer-relative keys) that replace the shard's. Tied layers share one Patch's
    tensors, so a tied window is held once in memory."""

    tensors: Mapping[str, Tensor]


LayerOverride = Mapping[str, Tensor] | Patch | object


class _StopForward(Exception):
    pass


class _Standin(nn.Module):
    """Base of the modules put in place of decoder layers: attribute reads the model's forward
    makes on its layers (``attention_type``, ``layer_idx``, ...) fall through to the real layer."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        self.__dict__["_original"] = original

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)


class _Recorder(_Standin):
    """Stands in for decoder layer ``index`` during the capture pass."""

    def __init__(self, original: nn.Module, index: int, store: dict[int, tuple[tuple, dict]], last: int):
        super().__init__(original)
        self.index, self.store, self.last = index, store, last

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.store[self.index] = (args, kwargs)
        if self.index == self.last:
            self.store[-1] = ((hidden_states,), {})
            raise _StopForward
        return hidden_states


class _Injector(_Standin):
    """Stands in for layer 0 in the finishing pass: returns the streamed final hidden state."""

    def __init__(self, original: nn.Module, hidden: Tensor):
        super().__init__(original)
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.hidden


class _Identity(_Standin):
    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@dataclass
class BatchState:
    """One batch in flight: its token ids, mask, current hidden state [b, T, H] and the exact
    arguments the model passes each layer."""

    input_ids: Tensor
    attention_mask: Tensor | None
    hidden: Tensor
    layer_args: dict[int, tuple[tuple, dict]] = field(default_factory=dict)


class _PerExpert:
    """A fused expert tensor [E, ...] kept in its stored precision while its layer is resident.
    The experts' eager forward reads it only as ``tensor[expert]``; each such slice comes back in
    the compute dtype, so one expert's weights are upcast at a time instead of the whole layer
    (the same values: the cast is exact)."""

    def __init__(self, stored: Tensor, dtype: torch.dtype):
        self.stored, self.dtype = stored, dtype
        self.shape, self.device = stored.shape, stored.device

    def __getitem__(self, index: Any) -> Tensor:
        return self.stored[index].to(self.dtype)


def _set_tensor(module: nn.Module, name: str, value: Tensor | _PerExpert | None) -> None:
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    if isinstance(value, _PerExpert):  # read by indexing only: stored as it is
        module._parameters[leaf] = value  # type: ignore[assignment]
    elif leaf in module._parameters:
        module._parameters[leaf] = None if value is None else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _upcast_embedding(mod: nn.Module, dtype: torch.dtype, forward: Callable[[Tensor], Tensor], ids: Tensor) -> Tensor:
    """The embedding module's own forward (scaling included, e.g. Gemma's) on a ``dtype`` table
    of just the rows ``ids`` look up."""
    table = mod.get_parameter("weight")
    uniq, inv = torch.unique(ids, return_inverse=True)
    mod._parameters["weight"] = nn.Parameter(table[uniq].to(dtype), requires_grad=False)
    try:
        return forward(inv.reshape(ids.shape))
    finally:
        mod._parameters["weight"] = table


def _upcast_linear(mod: nn.Linear, dtype: torch.dtype, x: Tensor) -> Tensor:
    """``mod(x)`` computed in ``dtype`` from a lower-precision weight, cast one chunk of output
    rows (~64 MB in ``dtype``) at a time."""
    w, b = mod.weight, mod.bias
    x = x.to(dtype)
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    step = max(1, (64 << 20) // (w.shape[1] * x.element_size()))
    for s in range(0, w.shape[0], step):
        out[..., s : s + step] = F.linear(x, w[s : s + step].to(dtype), None if b is None else b[s : s + step].to(dtype))
    return out


class LayerStreamedModel:
    """A sharded model run layer by layer. ``overrides`` replace (or SKIP) individual layers:
    compressed candidates are expressed this way without rewriting the shards."""

    def __init__(
        self,
        shard_dir: Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        overrides: Mapping[int, LayerOverride] | None = None,
    ):
        """``dtype``/``device`` default to the task's compute (:mod:`mlpfuse.core.compute`): the
        CPU in float32 unless the orchestrator gave the task a GPU or a precision."""
        from transformers import AutoConfig

        self.shard_dir = Path(shard_dir)
        self.meta = load_shard_meta(self.shard_dir)
        self.config = AutoConfig.from_pretrained(self.shard_dir)
        self.config.use_cache = False
        self.family: FamilyAdapter = family_for(self.config)
        self.num_layers = self.family.num_layers(self.config)
        compute = current_compute()
        self.dtype = dtype if dtype is not None else compute.dtype(stored_dtype(self.shard_dir))
        self.device = torch.device(device) if device is not None else compute.torch_device
        self.overrides = dict(overrides or {})
        # Compressed experts can have any size; the grouped-matmul kernels need aligned strides.
        if getattr(self.config, "_experts_implementation", None) is not None or self.family.moe is not None:
            self.config._experts_implementation = "eager"
        self.model = build_skeleton(self.config)
        self.model.eval()
        self.layers: nn.ModuleList = self.model.get_submodule(self.family.layers_path)  # type: ignore[assignment]
        self._layer_param_names = [
            [n for n, _ in layer.named_parameters()] for layer in self.layers
        ]
        self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Buffers (rotary inv_freq, position ids) were built for real on the CPU.
        for mod in self.model.modules():
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.device != self.device and b.device.type != "meta":
                    mod._buffers[bname] = b.to(self.device)
        # The non-layer weights (embeddings, final norm, head) are loaded when a batch first needs
        # them: stages that only read layer files (compress) never hold them.
        self._rest_loaded = False

    def _load_rest(self) -> None:
        if self._rest_loaded:
            return
        self._rest_loaded = True
        dtype = self.dtype
        # The vocabulary-sized tensors (input embedding, output head) stay in their stored
        # precision: the embedding's rows are cast as they are looked up, the head's in chunks as
        # it runs (the same values as casting the whole table first, at a fraction of the memory).
        emb = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings() if self.family.causal else None
        stored = {f"{n}.weight" for n, m in self.model.named_modules() if m is emb or (head is not None and m is head)}
        with safe_open(str(self.shard_dir / "rest.safetensors"), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                keep = k in stored and self._stored(t)
                _set_tensor(self.model, k, t.to(device=self.device, dtype=t.dtype if keep else self._cast(t)))
                del t
        for name in self.meta.get("tied_head", []):
            _set_tensor(self.model, name, emb.get_parameter("weight").data)
        if emb.weight.dtype != dtype:
            emb.forward = partial(_upcast_embedding, emb, dtype, emb.forward)
        if isinstance(head, nn.Linear) and head.weight.dtype != dtype:
            head.forward = partial(_upcast_linear, head, dtype)  # type: ignore[method-assign]

    def _cast(self, t: Tensor) -> torch.dtype:
        return self.dtype if t.is_floating_point() else t.dtype

    def _stored(self, t: Tensor) -> bool:
        """Floating point in a lower precision than the compute dtype."""
        return t.is_floating_point() and t.element_size() < torch.empty((), dtype=self.dtype).element_size()

    # ----- layers -------------------------------------------------------------------------
    def layer_state(self, i: int) -> dict[str, Tensor]:
        """Layer i's tensors (relative keys), from the override or the shard file."""
        ov = self.overrides.get(i)
        if ov is not None and ov is not SKIP and not isinstance(ov, Patch):
            return dict(ov)  # type: ignore[call-overload]
        with safe_open(str(self.shard_dir / layer_file(i)), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if isinstance(ov, Patch):
            sd.update(ov.tensors)
        return sd

    def layer_shapes(self, i: int) -> dict[str, Tensor]:
        """Layer i's base tensors on the meta device (shapes and dtypes from the shard file's
        header; nothing is read)."""
        return tensor_header(self.shard_dir / layer_file(i))

    @contextmanager
    def layer(self, i: int, state: Mapping[str, Tensor] | None = None) -> Iterator[nn.Module]:
        """Materialise decoder layer ``i`` (from ``state`` if given), yield it, release it."""
        if self.overrides.get(i) is SKIP and state is None:
            yield _Identity(self.layers[i])
            return
        module = self.layers[i]
        sd = dict(state) if state is not None else self.layer_state(i)
        expected = set(self._layer_param_names[i])
        unknown = set(sd) - expected - {n for n, _ in module.named_buffers()}
        if unknown:
            raise ValueError(f"layer {i}: tensors {sorted(unknown)[:5]} have no place in the layer")
        experts = f"{self.family.moe.path}." if self.family.moe is not None else None
        keys = list(sd)
        v: Tensor | None = None
        for k in keys:
            # popped: the stored (memory-mapped) tensor that was cast goes, with its pages
            v = sd.pop(k)
            if experts and k.startswith(experts) and k.endswith("_proj") and v.dim() == 3 and self._stored(v):
                _set_tensor(module, k, _PerExpert(v.to(self.device), self.dtype))
            else:
                _set_tensor(module, k, v.to(device=self.device, dtype=self._cast(v)))
        v = None
        sync_conv1d_widths(module)
        try:
            yield module
        finally:
            for k in keys:
                if k in expected:
                    _set_tensor(module, k, torch.empty(0, device="meta"))

    # ----- the two model passes -------------------------------------------------------------
    def _forward_base(self, input_ids: Tensor, attention_mask: Tensor | None, **extra: Any) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), **extra}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if self.family.causal:
            kwargs["use_cache"] = False
        return self.model(**kwargs)

    @torch.no_grad()
    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> BatchState:
        """Embed ``input_ids`` [b, T] and capture each layer's arguments."""
        self._load_rest()
        store: dict[int, tuple[tuple, dict]] = {}
        originals = list(self.layers)
        last = len(originals) - 1
        for i in range(len(originals)):
            self.layers[i] = _Recorder(originals[i], i, store, last)
        try:
            self._forward_base(input_ids, attention_mask)
        except _StopForward:
            pass
        finally:
            for i, m in enumerate(originals):
                self.layers[i] = m
        # The recorder of layer 0 saw the embeddings; layers pass the same hidden tensor along.
        hidden = store.pop(-1)[0][0]
        return BatchState(input_ids, attention_mask, hidden, store)

    @torch.no_grad()
    def finish(self, state: BatchState, keep_last: int = 0) -> Tensor:
        """Final norm and head on ``state.hidden``: logits [b, T, V] (encoders: hidden [b, T, H]).
        ``keep_last`` > 0: logits of the last ``keep_last`` positions only (the head runs on just
        those where the model takes ``logits_to_keep``)."""
        self._load_rest()
        originals = list(self.layers)
        self.layers[0] = _Injector(originals[0], state.hidden)
        for i in range(1, len(originals)):
            self.layers[i] = _Identity(originals[i])
        extra = {"logits_to_keep": keep_last} if keep_last and self._takes_logits_to_keep else {}
        try:
            out = self._forward_base(state.input_ids, state.attention_mask, **extra)
        finally:
            for i, m in enumerate(originals):
                self.layers[i] = m
        if not self.family.causal:
            return out.last_hidden_state
        return out.logits[:, -keep_last:] if keep_last else out.logits

    @staticmethod
    def apply(layer: nn.Module, i: int, state: BatchState) -> Tensor:
        args, kwargs = state.layer_args[i]
        out = layer(state.hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(
        self,
        states: list[BatchState],
        *,
        start: int = 0,
        stop: int | None = None,
        on_layer: Callable[[int, nn.Module, list[BatchState]], None] | None = None,
        progress: bool = False,
    ) -> list[BatchState]:
        """Carry every batch through layers ``start..stop-1`` in place, one layer resident.
        ``on_layer(i, layer, states)`` runs while layer i is loaded, after it was applied."""
        from tqdm import tqdm

        stop = self.num_layers if stop is None else stop
        for i in tqdm(range(start, stop), desc="layers", unit="layer", disable=not progress, leave=False):
            with self.layer(i) as layer:
                for s in states:
                    s.hidden = self.apply(layer, i, s)
                if on_layer is not None:
                    on_layer(i, layer, states)
        return states

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Convenience: the full streamed forward of one batch."""
        (state,) = self.run([self.start(input_ids, attention_mask)])
        return self.finish(state)
