"""Checks of a distillation's inputs before any training step: teacher and student compatible, batches
well-formed, tied parameters still shared."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mlpfuse.stages.model.trainer import DistillConfig


def check_models(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig,
    layer_map: list[int] | None = None,
) -> list[int] | None:
    """Refuse a teacher that is (or shares storage with) the student; returns ``layer_map``
    checked against the two models (None stays None: the identity, equal layer counts)."""
    if student is teacher:
        raise ValueError(
            "teacher is the student: distill against the original (uncompressed) model, a separate object"
        )
    teacher_storage = {_storage_ptr(p) for p in teacher.parameters()} - {0}
    shared = [n for n, p in student.named_parameters() if _storage_ptr(p) in teacher_storage]
    if shared:
        raise ValueError(
            f"student and teacher share parameter storage ({', '.join(shared[:5])}"
            f"{', ...' if len(shared) > 5 else ''}): the teacher must be an independent copy of the original"
        )
    s = getattr(student.config, "hidden_size", None)
    t = getattr(teacher.config, "hidden_size", None)
    if s != t:
        raise ValueError(
            f"student hidden_size={s} differs from teacher hidden_size={t}: "
            "layer-wise MSE needs them equal"
        )
    n_s = getattr(student.config, "num_hidden_layers", None)
    n_t = getattr(teacher.config, "num_hidden_layers", None)
    if layer_map is None:
        if n_s != n_t:
            raise ValueError(
                f"student num_hidden_layers={n_s} differs from teacher num_hidden_layers={n_t}: "
                "layer-wise MSE needs them equal, or a layer_map (see layer_map_for)"
            )
        return None
    layer_map = [int(i) for i in layer_map]
    if (
        n_s is None
        or n_t is None
        or len(layer_map) != n_s + 1
        or layer_map[0] != 0
        or layer_map[-1] != n_t
        or any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False))
    ):
        raise ValueError(
            f"layer_map {layer_map} must have one entry per student hidden state ({n_s} layers + "
            f"embeddings), strictly increase from 0 (embeddings) and end at the teacher's final "
            f"output ({n_t})"
        )
    return None if layer_map == list(range(n_t + 1)) else layer_map


def _storage_ptr(t: Tensor) -> int:
    if t.device.type == "meta":
        return 0
    return int(t.untyped_storage().data_ptr())


def check_batches(batches: list[Tensor], config: DistillConfig) -> None:
    if not batches:
        raise ValueError("batches is empty")
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"batches[{i}] must be an integer tensor [micro_batch, T], got {_describe(b)}"
            )
        if b.shape[0] != config.micro_batch:
            raise ValueError(
                f"batches[{i}] has {b.shape[0]} sequences, micro_batch={config.micro_batch}"
            )


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one nn.Parameter (tied embeddings, FF-merged windows)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def check_ties(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = model.get_parameter(names[0])
        broken = [n for n in names[1:] if model.get_parameter(n) is not first]
        if broken:
            raise RuntimeError(
                f"tied parameters came apart during distillation: {names[0]} vs {broken}"
            )

