"""Where a stage computes: the device its task holds and the forward passes' precision.

The orchestrator sets it around a stage function (``use_compute``); the model code reads it
(``current_compute``) when it builds a runner. A stage function called directly, outside the
orchestrator, computes on the CPU in float32, as it always has.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Compute:
    device: str = "cpu"  # "cpu" or "cuda" (the task's GPU; Ray sets CUDA_VISIBLE_DEVICES)
    precision: str = "auto"

    def dtype(self, stored: torch.dtype) -> torch.dtype:
        """The forward passes' dtype for a checkpoint stored in ``stored``: "auto" keeps a 16-bit
        stored precision on a GPU and computes in float32 on CPUs (and for float32 checkpoints)."""
        if self.precision != "auto":
            return getattr(torch, self.precision)
        if self.device != "cpu" and stored in (torch.bfloat16, torch.float16):
            return stored
        return torch.float32

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


_CURRENT: contextvars.ContextVar[Compute | None] = contextvars.ContextVar("mlpfuse_compute", default=None)


def current_compute() -> Compute:
    return _CURRENT.get() or Compute()


def resolve_device(gpus: float) -> str:
    """"cuda" when the task was granted a GPU and this process can use one, else "cpu"."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


@contextmanager
def use_compute(compute: Compute) -> Iterator[Compute]:
    if compute.precision not in PRECISIONS:
        raise ValueError(f"precision {compute.precision!r}; one of {', '.join(PRECISIONS)}")
    token = _CURRENT.set(compute)
    try:
        yield compute
    finally:
        _CURRENT.reset(token)
