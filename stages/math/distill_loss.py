"""The distillation losses: per-layer hidden-state error between student and teacher, and the
map from a student layer to the teacher layer it came from (dropped layers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    pass


def layer_mse(
    student_hidden: tuple[Tensor, ...],
    teacher_hidden: tuple[Tensor, ...],
    layer_map: list[int] | None = None,
    relative: bool = False,
) -> Tensor:
    """Mean over decoder layers of the MSE between hidden states, each [b, T, H]; entry 0 (the
    embeddings) is skipped. Computed in float32 whatever the models' dtype. ``layer_map[j]``: the
    teacher entry student entry j is compared with (None: the same index, equal lengths).
    ``relative``: per token, the squared error over the teacher's squared norm, averaged."""
    if student_hidden is None or teacher_hidden is None:
        raise RuntimeError("a model returned no hidden states for output_hidden_states=True")
    if layer_map is not None:
        if len(layer_map) != len(student_hidden) or max(layer_map) >= len(teacher_hidden):
            raise ValueError(
                f"layer_map {layer_map} does not fit {len(student_hidden)} student and "
                f"{len(teacher_hidden)} teacher hidden states"
            )
        teacher_hidden = tuple(teacher_hidden[i] for i in layer_map)
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden) - 1} layers, teacher {len(teacher_hidden) - 1}: "
            "layer-wise distillation needs the same number of layers"
        )
    def error(s: Tensor, t: Tensor) -> Tensor:
        s, t = s.float(), t.float()
        if not relative:
            return F.mse_loss(s, t)
        return (((s - t) ** 2).sum(-1) / (t * t).sum(-1).clamp_min(1e-12)).mean()

    per_layer = [error(s, t) for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)]
    return torch.stack(per_layer).mean()


def layer_map_for(num_teacher_layers: int, skipped: set[int] | list[int]) -> list[int]:
    """The ``layer_map`` of a student made from the teacher by dropping decoder layers ``skipped``
    (base indices): student hidden state j (the output of its layer j-1, the (j-1)-th kept base
    layer k) is compared with teacher state k+1; entry 0 (embeddings) with 0; the last entry (the
    final output, after the final norm in both models) with the teacher's last, also when the
    teacher's last layer was the one dropped."""
    dropped = {int(i) for i in skipped}
    bad = sorted(i for i in dropped if not 0 <= i < num_teacher_layers)
    if bad:
        raise ValueError(f"skipped layers {bad} outside 0..{num_teacher_layers - 1}")
    kept = [i for i in range(num_teacher_layers) if i not in dropped]
    if not kept:
        raise ValueError("every layer is skipped")
    return [0, *(k + 1 for k in kept[:-1]), num_teacher_layers]

