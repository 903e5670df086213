"""evaluate: perplexity on the held-out split, streamed layer by layer.

The usual sliding-window protocol (as in the transformers perplexity guide): windows of
``window`` tokens advance by ``stride``; each window scores only the tokens no earlier window
scored, so every token after a document's first is predicted once, with up to
``window - stride`` tokens of context.

Prefix sharing: a candidate that changes nothing before layer s computes the same hidden states
as the base model up to layer s. The ``prefix`` stage runs the base model once over every
evaluation window and keeps the hidden state entering each requested layer; a candidate's
evaluation then starts at its first changed layer from those states, skipping layers 0..s-1.
The windows of a smaller token budget are a prefix of the full list, so one prefix artifact serves
every round of successive halving, and a round can score only the windows beyond the previous
round's (``after_tokens``) and add its ``nll_sum`` and ``tokens`` to that round's. Results count
``layer_tokens`` (tokens x layers run), the work prefix sharing and increments save.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.stages.data import read_eval
from mlpfuse.stages.model.runner import LayerOverride, LayerStreamedModel


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(512, ge=8)
    stride: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    # Score at most this many tokens (0: all of the evaluation split).
    max_tokens: int = Field(0, ge=0)
    # Score only the windows beyond those of a smaller budget (an earlier halving round's): the
    # result is that increment's (``nll_sum``, ``tokens``), to be added to the earlier round's.
    after_tokens: int = Field(0, ge=0)


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


def batches_by_length(windows: list[tuple[np.ndarray, int]], batch_size: int) -> list[tuple[Tensor, list[int], list[int]]]:
    """(token ids [b, T], scored tokens per row, window index per row): windows of one length
    batched together, in a fixed order."""
    groups: dict[int, list[int]] = {}
    for j, w in enumerate(windows):
        groups.setdefault(len(w[0]), []).append(j)
    out = []
    for _, idx in sorted(groups.items()):
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            ids = torch.from_numpy(np.stack([windows[j][0] for j in chunk]))
            out.append((ids, [windows[j][1] for j in chunk], chunk))
    return out


class PrefixStates:
    """The base model's hidden states entering some layers, per evaluation window (a ``prefix``
    artifact)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / PREFIX_META).read_text())
        self.layers = set(self.meta["layers"])

    def matches(self, config: EvaluateConfig, n_windows: int) -> bool:
        """Same windows, and at least the first ``n_windows`` of them cached."""
        return (self.meta["window"] == config.window and self.meta["stride"] == config.stride
                and self.meta["windows"] >= n_windows)

    def hidden(self, layer: int, windows: list[int]) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / _prefix_file(layer)), framework="pt") as f:
            return torch.stack([f.get_tensor(f"w{j}") for j in windows])


def perplexity(
    model: LayerStreamedModel, streams: list[np.ndarray], config: EvaluateConfig, *, progress: bool = False,
    prefix: PrefixStates | None = None, start: int = 0,
) -> dict:
    """Streamed perplexity of ``model`` on ``streams`` (token id arrays). With ``prefix`` and
    ``start`` > 0, layers before ``start`` are not run: each window starts from the base model's
    hidden state entering layer ``start``."""
    if start and (prefix is None or start not in prefix.layers):
        raise ValueError(f"no cached base hidden states entering layer {start}")
    windows = sliding_windows(streams, config.window, config.stride, config.max_tokens)
    # The windows of a smaller budget are a prefix of this list: an increment skips them.
    skip = min(len(sliding_windows(streams, config.window, config.stride, config.after_tokens)), len(windows)) \
        if config.after_tokens else 0
    todo = windows[skip:]
    batches = batches_by_length(todo, config.batch_size)
    states = [model.start(ids) for ids, _, _ in batches]
    if start:
        assert prefix is not None
        for state, (_, _, idx) in zip(states, batches, strict=True):
            state.hidden = prefix.hidden(start, [skip + j for j in idx]).to(state.hidden.dtype)
    if states:
        model.run(states, start=start, progress=progress)
    nll, count = 0.0, 0
    for state, (ids, n_target, _) in zip(states, batches, strict=True):
        logits = model.finish(state, keep_last=max(n_target) + 1)  # the scored positions' logits only
        a, b = _nll(logits, ids, n_target)
        nll, count = nll + a, count + b
    mean = nll / max(count, 1)
    layer_tokens = sum(len(w[0]) for w in todo) * (model.num_layers - start)
    return {"perplexity": math.exp(mean), "nll": mean, "nll_sum": nll, "tokens": count, "windows": len(todo),
            "skipped_windows": skip, "start_layer": start, "layer_tokens": layer_tokens}


def evaluate_model(
    shard_dir: Path, data_dir: Path, config: EvaluateConfig,
    overrides: Mapping[int, LayerOverride] | None = None, progress: bool = False,
    prefix: PrefixStates | None = None, start: int = 0,
) -> dict:
    model = LayerStreamedModel(shard_dir, overrides=overrides)
    return perplexity(model, read_eval(data_dir), config, progress=progress, prefix=prefix, start=start)


def run(config: EvaluateConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` (the base model), ``data`` (the tokenize artifact), optionally
    ``overlay`` (a compress artifact: the candidate to score) and ``prefix`` (the base model's
    cached hidden states: the candidate starts at its first changed layer when it is cached)."""
    from mlpfuse.core.artifacts import write_json_atomic
    from mlpfuse.stages.model.overlay import first_changed_layer, load_overrides

    overrides = load_overrides(inputs.get("overlay"))
    prefix, start = None, 0
    if inputs.get("prefix") is not None and overrides:
        prefix = PrefixStates(inputs["prefix"])
        first = first_changed_layer(inputs["overlay"]) or 0
        n_windows = len(sliding_windows(read_eval(inputs["data"]), config.window, config.stride, config.max_tokens))
        if prefix.matches(config, n_windows) and first in prefix.layers:
            start = first
    result = evaluate_model(inputs["shard"], inputs["data"], config, overrides=overrides, progress=True,
                            prefix=prefix, start=start)
    write_json_atomic(out_dir / "metrics.json", result)
    return result


# ----- the prefix stage ----------------------------------------------------------------------
PREFIX_META = "prefix.json"


def _prefix_file(layer: int) -> str:
    return f"hidden/L{layer:05d}.safetensors"


class PrefixConfig(EvaluateConfig):
    """The evaluation windows (``max_tokens``: the largest budget that will be scored) and the
    layers whose incoming hidden states to keep."""

    layers: tuple[int, ...] = ()


def run_prefix(config: PrefixConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """One base-model pass over the evaluation windows, keeping the hidden state that enters each
    of ``config.layers`` (float32 safetensors, one file per layer, one tensor per window). Each
    layer's file is committed as a part, so an interrupted pass keeps what it finished."""

    from mlpfuse.core.artifacts import commit_part, part_done, save_safetensors, write_json_atomic

    model = LayerStreamedModel(inputs["shard"])
    bad = [s for s in config.layers if not 0 < s < model.num_layers]
    if bad:
        raise ValueError(f"prefix layers {bad} out of range 1..{model.num_layers - 1}")
    windows = sliding_windows(read_eval(inputs["data"]), config.window, config.stride, config.max_tokens)
    batches = batches_by_length(windows, config.batch_size)
    wanted = set(config.layers)
    todo = {s for s in wanted if not part_done(out_dir, _prefix_file(s))}
    if todo:
        states = [model.start(ids) for ids, _, _ in batches]

        def keep(i: int, _layer: object, states: list) -> None:
            if i + 1 in todo:
                tensors = {f"w{j}": s.hidden[r].contiguous().clone()
                           for s, (_, _, idx) in zip(states, batches, strict=True) for r, j in enumerate(idx)}
                commit_part(out_dir, _prefix_file(i + 1), partial(save_safetensors, tensors))

        model.run(states, stop=max(todo), on_layer=keep, progress=True)
    meta = {"layers": sorted(wanted), "window": config.window, "stride": config.stride,
            "windows": len(windows), "layer_tokens": sum(len(w[0]) for w in windows) * max(wanted, default=0)}
    write_json_atomic(out_dir / PREFIX_META, meta)
    return meta
