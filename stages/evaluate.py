"""evaluate: perplexity on each held-out set, streamed layer by layer, and how far a candidate's
next-token distribution is from the base model's.

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

Sets: every held-out set (each calibration corpus's, each unseen corpus's) is scored on its own
windows, up to ``max_tokens`` per set, and reported alone. Against the base model (its evaluation's
``reference``: top-K next tokens per scored position and NLL per window), a candidate's result also
carries per set the KL from the base distribution, top-1 agreement and the base's NLL on exactly
the same windows, so each round's ratio to the base is like for like.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.stages.data import read_eval_sets
from mlpfuse.stages.model.runner import LayerOverride, LayerStreamedModel


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(512, ge=8)
    stride: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    # Score at most this many tokens of each evaluation set (0: all of the evaluation split).
    max_tokens: int = Field(0, ge=0)
    # Score only the windows beyond those of a smaller budget (an earlier halving round's): the
    # result is that increment's (``nll_sum``, ``tokens``), to be added to the earlier round's.
    after_tokens: int = Field(0, ge=0)
    # The base model's evaluation keeps its K most likely next tokens per scored position: what
    # candidates' KL and top-1 agreement are measured against.
    top_k: int = Field(32, ge=1)


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


def kl_top1(logp: Tensor, ref_idx: Tensor, ref_logp: Tensor) -> tuple[float, int]:
    """(Σ KL(base ‖ model), number of tokens whose most likely next token agrees with the base's)
    over scored positions: ``logp`` [n, V] the model's log-probabilities, ``ref_idx``/``ref_logp``
    [n, K] the base model's top-K tokens (most likely first) and their log-probabilities.

    The KL is taken over the K tokens plus one bucket for the rest of the vocabulary (each side's
    mass outside the base's top K). Merging outcomes never raises a KL (log-sum inequality), so this
    is a lower bound of the full-vocabulary KL, exact when the base's top K hold all of its mass."""
    q_log = logp.gather(1, ref_idx.long())
    p = ref_logp.exp()
    kl = (p * (ref_logp - q_log)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_log.exp().sum(-1)).clamp_min(1e-30)
    kl = kl + torch.where(p_tail > 1e-12, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    top1 = int((logp.argmax(-1) == ref_idx[:, 0].long()).sum())
    return float(kl.clamp_min(0).sum()), top1


REFERENCE = "reference.safetensors"
REFERENCE_META = "reference.json"


class Reference:
    """The base model's scored positions (an ``evaluate`` artifact of the base model): per window,
    its top-K next-token log-probabilities and its summed NLL, for KL, top-1 agreement and
    per-set ratios on exactly the windows a candidate is scored on."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / REFERENCE_META).read_text())

    def matches(self, config: EvaluateConfig, keys: list[str]) -> bool:
        """Same windows, and every one of ``keys`` scored by the base model."""
        return (self.meta["window"] == config.window and self.meta["stride"] == config.stride
                and set(keys) <= self.meta["nll"].keys())

    def get(self, keys: list[str]) -> dict[str, tuple[Tensor, Tensor, float]]:
        from safetensors import safe_open

        with safe_open(str(self.path / REFERENCE), framework="pt") as f:
            return {k: (f.get_tensor(f"{k}/idx"), f.get_tensor(f"{k}/logp"), float(self.meta["nll"][k])) for k in keys}


def batches_by_length(windows: Sequence[tuple[np.ndarray, int, *tuple[Any, ...]]], batch_size: int
                      ) -> list[tuple[Tensor, list[int], list[int]]]:
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


Sets = Mapping[str, list[np.ndarray]]


def as_sets(streams: Sets | list[np.ndarray]) -> Sets:
    return streams if isinstance(streams, Mapping) else {"heldout": list(streams)}


def set_windows(sets: Sets, config: EvaluateConfig, max_tokens: int | None = None, after_tokens: int = 0
                ) -> list[tuple[np.ndarray, int, str, str]]:
    """(token ids, scored tokens, window key, set) of every window to score: each set's windows up
    to ``max_tokens`` scored tokens *per set* (default ``config.max_tokens``), without those of an
    ``after_tokens`` budget (an earlier round's: each set's windows of a smaller budget are a
    prefix of its list). A window's key (``s<set>w<index>``) names it in the prefix and reference
    artifacts whatever the budget."""
    limit = config.max_tokens if max_tokens is None else max_tokens
    out = []
    for si, (name, streams) in enumerate(sets.items()):
        w = sliding_windows(streams, config.window, config.stride, limit)
        skip = min(len(sliding_windows(streams, config.window, config.stride, after_tokens)), len(w)) \
            if after_tokens else 0
        out += [(ids, n, f"s{si}w{j}", name) for j, (ids, n) in enumerate(w) if j >= skip]
    return out


class PrefixStates:
    """The base model's hidden states entering some layers, per evaluation window (a ``prefix``
    artifact)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / PREFIX_META).read_text())
        self.layers = set(self.meta["layers"])

    def matches(self, config: EvaluateConfig, keys: list[str]) -> bool:
        """Same windows, and every one of ``keys`` cached."""
        return (self.meta["window"] == config.window and self.meta["stride"] == config.stride
                and set(keys) <= set(self.meta["keys"]))

    def hidden(self, layer: int, keys: list[str]) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / _prefix_file(layer)), framework="pt") as f:
            return torch.stack([f.get_tensor(k) for k in keys])


def perplexity(
    model: LayerStreamedModel, streams: Sets | list[np.ndarray], config: EvaluateConfig, *, progress: bool = False,
    prefix: PrefixStates | None = None, start: int = 0, reference: Reference | None = None,
    keep_reference: dict[str, tuple[Tensor, Tensor, float]] | None = None,
) -> dict:
    """Streamed perplexity of ``model`` on each evaluation set (``streams``: token id arrays per
    set, or one list). With ``prefix`` and ``start`` > 0, layers before ``start`` are not run:
    each window starts from the base model's hidden state entering layer ``start``. With
    ``reference`` (the base model's), each set also gets the KL from the base's next-token
    distribution, top-1 agreement and the base's NLL on the same windows; ``keep_reference``
    (a dict) is filled with this model's top-K per window, to serve as a reference."""
    if start and (prefix is None or start not in prefix.layers):
        raise ValueError(f"no cached base hidden states entering layer {start}")
    sets = as_sets(streams)
    todo = set_windows(sets, config, config.max_tokens, config.after_tokens)
    batches = batches_by_length(todo, config.batch_size)
    states = [model.start(ids) for ids, _, _ in batches]
    if start:
        assert prefix is not None
        for state, (_, _, idx) in zip(states, batches, strict=True):
            state.hidden = prefix.hidden(start, [todo[j][2] for j in idx]).to(state.hidden.dtype)
    if states:
        model.run(states, start=start, progress=progress)
    per_set: dict[str, dict] = {name: {"nll_sum": 0.0, "tokens": 0} for name in sets}
    if reference is not None:
        for acc in per_set.values():
            acc.update(kl_sum=0.0, top1_sum=0, base_nll_sum=0.0)
    for state, (ids, n_target, idx) in zip(states, batches, strict=True):
        logits = model.finish(state, keep_last=max(n_target) + 1)  # the scored positions' logits only
        ref = reference.get([todo[j][2] for j in idx]) if reference is not None else {}
        for b, (n, j) in enumerate(zip(n_target, idx, strict=True)):
            key, name = todo[j][2], todo[j][3]
            logp = torch.log_softmax(logits[b, -n - 1 : -1].float(), dim=-1)
            nll = -float(logp.gather(1, ids[b, -n:, None].to(logp.device)).sum())
            acc = per_set[name]
            acc["nll_sum"] += nll
            acc["tokens"] += n
            if key in ref:
                r_idx, r_logp, r_nll = ref[key]
                kl, top1 = kl_top1(logp, r_idx.to(logp.device), r_logp.to(logp.device))
                acc["kl_sum"] += kl
                acc["top1_sum"] += top1
                acc["base_nll_sum"] += r_nll
            if keep_reference is not None:
                top = logp.topk(min(config.top_k, logp.shape[-1]), dim=-1)
                keep_reference[key] = (top.indices.to(torch.int32).cpu(), top.values.cpu(), nll)
        del logits
    for acc in per_set.values():
        acc["perplexity"] = math.exp(acc["nll_sum"] / max(acc["tokens"], 1))
    nll_sum = sum(a["nll_sum"] for a in per_set.values())
    count = sum(a["tokens"] for a in per_set.values())
    mean = nll_sum / max(count, 1)
    layer_tokens = sum(len(w[0]) for w in todo) * (model.num_layers - start)
    n_all = len(set_windows(sets, config, config.max_tokens))
    out = {"perplexity": math.exp(mean), "nll": mean, "nll_sum": nll_sum, "tokens": count, "windows": len(todo),
           "skipped_windows": n_all - len(todo), "start_layer": start, "layer_tokens": layer_tokens, "sets": per_set}
    if reference is not None:
        out["kl"] = sum(a["kl_sum"] for a in per_set.values()) / max(count, 1)
        out["top1"] = sum(a["top1_sum"] for a in per_set.values()) / max(count, 1)
    return out


def evaluate_model(
    shard_dir: Path, data_dir: Path, config: EvaluateConfig,
    overrides: Mapping[int, LayerOverride] | None = None, progress: bool = False,
    prefix: PrefixStates | None = None, start: int = 0, reference: Reference | None = None,
    keep_reference: dict[str, tuple[Tensor, Tensor, float]] | None = None,
) -> dict:
    model = LayerStreamedModel(shard_dir, overrides=overrides)
    return perplexity(model, read_eval_sets(data_dir), config, progress=progress, prefix=prefix, start=start,
                      reference=reference, keep_reference=keep_reference)


def run(config: EvaluateConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` (the base model), ``data`` (the tokenize artifact), optionally
    ``overlay`` (a compress artifact: the candidate to score), ``prefix`` (the base model's
    cached hidden states: the candidate starts at its first changed layer when it is cached) and
    ``reference`` (the base model's evaluate artifact: KL, top-1 agreement and per-set ratios).
    The base model's own evaluation (no overlay, no reference) keeps its top-K per window: it is
    every candidate's reference."""
    from safetensors.torch import save_file

    from mlpfuse.core.artifacts import write_atomic, write_json_atomic
    from mlpfuse.stages.model.overlay import first_changed_layer, load_overrides

    overrides = load_overrides(inputs.get("overlay"))
    sets = read_eval_sets(inputs["data"])
    keys = [w[2] for w in set_windows(sets, config, config.max_tokens, config.after_tokens)]
    prefix, start = None, 0
    if inputs.get("prefix") is not None and overrides:
        prefix = PrefixStates(inputs["prefix"])
        first = first_changed_layer(inputs["overlay"]) or 0
        if prefix.matches(config, keys) and first in prefix.layers:
            start = first
    reference = Reference(inputs["reference"]) if inputs.get("reference") is not None else None
    if reference is not None and not reference.matches(config, keys):
        reference = None  # other windows than the base model scored: no like-for-like comparison
    keep: dict[str, tuple[Tensor, Tensor, float]] | None = {} if inputs.get("overlay") is None and reference is None else None
    result = evaluate_model(inputs["shard"], inputs["data"], config, overrides=overrides, progress=True,
                            prefix=prefix, start=start, reference=reference, keep_reference=keep)
    if keep is not None:
        tensors = {f"{k}/{part}": t.contiguous() for k, (i, lp, _) in keep.items() for part, t in (("idx", i), ("logp", lp))}
        write_atomic(out_dir / REFERENCE, lambda p: save_file(tensors, str(p)))
        write_json_atomic(out_dir / REFERENCE_META, {"window": config.window, "stride": config.stride,
                                                     "top_k": config.top_k, "nll": {k: v[2] for k, v in keep.items()}})
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
    windows = set_windows(read_eval_sets(inputs["data"]), config, config.max_tokens)
    batches = batches_by_length(windows, config.batch_size)
    wanted = set(config.layers)
    todo = {s for s in wanted if not part_done(out_dir, _prefix_file(s))}
    if todo:
        states = [model.start(ids) for ids, _, _ in batches]

        def keep(i: int, _layer: object, states: list) -> None:
            if i + 1 in todo:
                tensors = {windows[j][2]: s.hidden[r].contiguous().clone()
                           for s, (_, _, idx) in zip(states, batches, strict=True) for r, j in enumerate(idx)}
                commit_part(out_dir, _prefix_file(i + 1), partial(save_safetensors, tensors))

        model.run(states, stop=max(todo), on_layer=keep, progress=True)
    meta = {"layers": sorted(wanted), "window": config.window, "stride": config.stride,
            "windows": len(windows), "keys": [w[2] for w in windows], "layer_tokens": sum(len(w[0]) for w in windows) * max(wanted, default=0)}
    write_json_atomic(out_dir / PREFIX_META, meta)
    return meta
