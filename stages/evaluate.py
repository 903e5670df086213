"""evaluate: perplexity on the held-out split, streamed layer by layer.

The usual sliding-window protocol (as in the transformers perplexity guide): windows of
``window`` tokens advance by ``stride``; each window scores only the tokens no earlier window
scored, so every token after a document's first is predicted once, with up to
``window - stride`` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from stages.data import read_eval
from stages.runner import LayerOverride, LayerStreamedModel


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(512, ge=8)
    stride: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    # Score at most this many tokens (0: all of the evaluation split).
    max_tokens: int = Field(0, ge=0)


def sliding_windows(streams: list[np.ndarray], window: int, stride: int, max_tokens: int = 0) -> list[tuple[np.ndarray, int]]:
    """(token ids [<= window], number of scored tokens at its end) for every window."""
    if stride > window:
        raise ValueError(f"stride={stride} exceeds window={window}: tokens would go unscored")
    out: list[tuple[np.ndarray, int]] = []
    scored = 0
    for ids in streams:
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            # A window's first token has no prediction inside it (with stride == window it goes unscored).
            n_target = min(end - prev_end, end - begin - 1)
            if end - begin >= 2 and n_target > 0:
                out.append((ids[begin:end], n_target))
                scored += n_target
            prev_end = end
            if end == len(ids) or (max_tokens and scored >= max_tokens):
                break
        if max_tokens and scored >= max_tokens:
            break
    return out


def _nll(logits: Tensor, ids: Tensor, n_target: list[int]) -> tuple[float, int]:
    total, count = 0.0, 0
    for b, n in enumerate(n_target):
        lg = logits[b, -n - 1 : -1].float()
        tgt = ids[b, -n:]
        total += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))
        count += n
    return total, count


def batches_by_length(windows: list[tuple[np.ndarray, int]], batch_size: int) -> list[tuple[Tensor, list[int]]]:
    groups: dict[int, list[tuple[np.ndarray, int]]] = {}
    for w in windows:
        groups.setdefault(len(w[0]), []).append(w)
    out = []
    for _, ws in sorted(groups.items()):
        for i in range(0, len(ws), batch_size):
            chunk = ws[i : i + batch_size]
            out.append((torch.from_numpy(np.stack([c[0] for c in chunk])), [c[1] for c in chunk]))
    return out


def perplexity(
    model: LayerStreamedModel, streams: list[np.ndarray], config: EvaluateConfig, *, progress: bool = False
) -> dict:
    """Streamed perplexity of ``model`` on ``streams`` (token id arrays)."""
    windows = sliding_windows(streams, config.window, config.stride, config.max_tokens)
    batches = batches_by_length(windows, config.batch_size)
    states = [model.start(ids) for ids, _ in batches]
    model.run(states, progress=progress)
    nll, count = 0.0, 0
    for state, (ids, n_target) in zip(states, batches, strict=True):
        logits = model.finish(state)
        a, b = _nll(logits, ids, n_target)
        nll, count = nll + a, count + b
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": len(windows)}


def evaluate_model(
    shard_dir: Path, data_dir: Path, config: EvaluateConfig,
    overrides: Mapping[int, LayerOverride] | None = None, progress: bool = False,
) -> dict:
    model = LayerStreamedModel(shard_dir, overrides=overrides)
    return perplexity(model, read_eval(data_dir), config, progress=progress)


def run(config: EvaluateConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` (the base model), ``data`` (the tokenize artifact) and optionally
    ``overlay`` (a compress artifact: the candidate to score)."""
    from stages.artifacts import write_json_atomic
    from stages.overlay import load_overrides

    overrides = load_overrides(inputs.get("overlay"))
    result = evaluate_model(inputs["shard"], inputs["data"], config, overrides=overrides, progress=True)
    write_json_atomic(out_dir / "metrics.json", result)
    return result
