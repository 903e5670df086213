"""The depth baselines: ``layer_drop`` removes whole decoder layers, ``ff_drop`` removes the FF
sublayer of chosen layers (their residual path stays)."""

from __future__ import annotations

from typing import Literal

import torch

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.methods.base import BuildContext, MethodConfig, method_layers
from mlpfuse.stages.model.families import FFBlockRef
from mlpfuse.stages.model.overlay import Overlay


class LayerDropMethod(MethodConfig):
    method: Literal["layer_drop"] = "layer_drop"


class FFDropMethod(MethodConfig):
    method: Literal["ff_drop"] = "ff_drop"


def drop_ff_block(m: FFDropMethod, ctx: BuildContext, i: int, ref: FFBlockRef, ff: FFWeights,
                  size: int | None = None) -> FFWeights:
    """The FF sublayer removed: a block of zero neurons (the layer's residual path stays)."""
    return ff.select(torch.zeros(0, dtype=torch.long))


def drop_layers(m: LayerDropMethod, ctx: BuildContext) -> Overlay:
    """Whole decoder layers removed."""
    ov = Overlay(skip=set(method_layers(m, ctx.num_layers)))
    if len(ov.skip) >= ctx.num_layers:
        raise InputError("layer_drop would remove every layer")
    return ov
