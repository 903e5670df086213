"""DeepSpeed ZeRO configurations for the distill stage.

The shipped files ``zero0.json``, ``zero2.json`` and ``zero3.json`` hold every setting that does
not depend on the run; the few that do are ``null`` in the file and must be filled by
:func:`zero_config` (a file value left ``null`` is an error, so nothing falls back to a DeepSpeed
default silently). Model-size-dependent bucket sizes are set by :func:`fit_buckets`.

The configs never name an optimizer: distill passes a client ``torch.optim.AdamW`` (hence
``zero_allow_untested_optimizer``), which avoids compiling DeepSpeed's Adam ops and keeps the
update identical to a plain torch loop.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent
# Explicit registry: ZeRO stage -> shipped file. Stage 1 is not shipped: stage 2 costs the same
# communication on one node and saves more memory.
ZERO_CONFIG_FILES: dict[int, Path] = {
    0: CONFIG_DIR / "zero0.json",
    2: CONFIG_DIR / "zero2.json",
    3: CONFIG_DIR / "zero3.json",
}

# Optimizer offload: fp32 master weights and Adam moments live in host memory. The client torch
# optimizer then runs on the CPU partitions; ``zero_force_ds_cpu_optimizer`` would otherwise
# demand DeepSpeedCPUAdam (a compiled op).
_OFFLOAD_OPTIMIZER: dict[str, Any] = {"device": "cpu", "pin_memory": True}


@cache
def _shipped(stage: int) -> dict[str, Any]:
    return json.loads(ZERO_CONFIG_FILES[stage].read_text())


def zero_config(
    stage: int,
    *,
    micro_batch: int,
    grad_accum: int,
    offload_optimizer: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config dict for ZeRO ``stage`` (0, 2 or 3), from the shipped JSON.

    ``micro_batch`` is the per-worker micro-batch (sequences per forward), ``grad_accum`` the
    number of micro-batches per optimizer step; DeepSpeed derives ``train_batch_size`` from them
    and the world size. ``offload_optimizer`` keeps optimizer state in host memory (stages 2 and 3
    only). ``bf16`` trains in bfloat16 with fp32 master weights.
    """
    if stage not in ZERO_CONFIG_FILES:
        raise ValueError(
            f"unknown ZeRO stage {stage!r}; shipped stages: {sorted(ZERO_CONFIG_FILES)}"
        )
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if offload_optimizer and stage == 0:
        raise ValueError(
            "offload_optimizer needs ZeRO stage 2 or 3 (stage 0 keeps no optimizer partition)"
        )

    config = copy.deepcopy(_shipped(stage))
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = grad_accum
    config["bf16"]["enabled"] = bool(bf16)
    if offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = dict(_OFFLOAD_OPTIMIZER)
        config["zero_force_ds_cpu_optimizer"] = False
    unfilled = _null_paths(config)
    if unfilled:
        raise ValueError(
            f"{ZERO_CONFIG_FILES[stage].name}: values left null: {', '.join(unfilled)}"
        )
    return config


def fit_buckets(config: dict[str, Any], *, hidden_size: int) -> dict[str, Any]:
    """A copy of ``config`` with the communication buckets sized for a model of ``hidden_size``.

    The rule is the one the Hugging Face integration uses for its ``"auto"`` values: reduce bucket
    ``h^2``, ZeRO-3 prefetch bucket ``0.9 h^2``, and parameters under ``10 h`` elements (norms,
    biases) kept whole on every worker, because gathering them costs more than it saves.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    config = copy.deepcopy(config)
    zero = config["zero_optimization"]
    stage = zero["stage"]
    if stage >= 2:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if stage == 2:
        zero["allgather_bucket_size"] = hidden_size * hidden_size
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    return config


def _null_paths(node: Any, prefix: str = "") -> list[str]:
    if node is None:
        return [prefix or "<root>"]
    if isinstance(node, dict):
        return [
            p for k, v in node.items() for p in _null_paths(v, f"{prefix}.{k}" if prefix else k)
        ]
    return []
