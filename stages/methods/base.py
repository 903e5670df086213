"""What every compression method configures and may read: the base of the method configs, and
the build context (the base shard's layers and FF blocks, collect's statistics and inputs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.features import moments, read_features, read_inputs, read_stats
from mlpfuse.stages.model.runner import LayerStreamedModel


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Layers to compress (None: all). Papers often spare the first layers; the planner chooses.
    layers: tuple[int, ...] | None = None

    @property
    def reads_tokens(self) -> bool:
        """Whether the build reads the calibration tokens (the data stage's output) itself."""
        return False


class SizedMethodConfig(MethodConfig):
    # Neurons kept per block: an absolute count, or a fraction of the block's intermediate size.
    keep: int | None = Field(None, ge=0)
    ratio: float | None = Field(None, ge=0, le=1)
    # A ratio's width is rounded down to a multiple of this (quantization group sizes, kernel tiles
    # and tensor-parallel splits want multiples of 64/128), where the block's own width is one and
    # at least one multiple stays; an explicit ``keep`` is taken as given.
    multiple_of: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_size(self) -> SizedMethodConfig:
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("give exactly one of keep (neurons) or ratio (fraction kept)")
        return self

    def k(self, size: int) -> int:
        # A ratio rounds down, so a parameter budget computed from it is never exceeded.
        k = self.keep if self.keep is not None else int(math.floor((self.ratio or 0) * size + 1e-9))
        m = self.multiple_of
        if self.keep is None and m > 1 and size % m == 0 and k >= m:
            k = k // m * m
        if not 1 <= k <= size:
            raise InputError(f"cannot keep {k} of {size} neurons (keep={self.keep}, ratio={self.ratio})")
        return k


class BuildContext:
    """What a method may read: base layer tensors, FF blocks, collect's statistics and inputs."""

    def __init__(self, shard_dir: Path, collect_dir: Path | None, data_dir: Path | None = None):
        self.model = LayerStreamedModel(shard_dir)
        self.data_dir = data_dir
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

    def need_data(self, what: str) -> Path:
        if self.data_dir is None:
            raise InputError(f"{what} needs the calibration tokens: add the data stage's output")
        return self.data_dir

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



def method_layers(m: MethodConfig, n: int) -> list[int]:
    layers = list(range(n)) if m.layers is None else sorted(set(m.layers))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise InputError(f"layers {bad} do not exist (the model has {n} layers: 0..{n - 1})")
    return layers

