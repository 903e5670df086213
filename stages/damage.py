"""damage: how much each layer's compression costs the model's output, measured once per layer
and width, so the planner can spend a parameter budget where it hurts least.

For every layer and every kept fraction ``j / steps`` of its FF neurons (j = 1..steps), the damage of
compressing *that layer alone* by activation-aware pruning and the ridge refit (the planner's
pruning candidate with refit), and of dropping the whole layer. The unit is what the planner ranks
by: the KL divergence of the model's next-token distribution from the base model's, in nats per
token, on the first ``tokens`` calibration tokens.

Measured end to end for each layer at one width (``reference``) and for the drop: the base model's
hidden states entering each layer are kept from one pass, and each variant runs the remaining
layers from there, so a layer costs two partial forwards. The damage at the other widths is that
measurement scaled by the block's own reconstruction error, which is exact and cheap from collect's
HᵀH: ``damage_i(f) = KL_i(reference) · SSE_i(f) / SSE_i(reference)``. The layer's sensitivity
(how much of the model's output an error there moves) is measured; the shape of its curve over
widths comes from its own error.

``damage.json``: ``{"fractions": [f_1..f_steps], "tokens": n, "measure", "layers": [{"layer", "sse":
[relative block error per fraction], "reference": f, "kl_reference", "kl_drop", "damage": [per
fraction]}]}``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.core.artifacts import write_json_atomic
from mlpfuse.core.errors import InputError
from mlpfuse.stages.data import read_calib
from mlpfuse.stages.math.pruning import activation_scores, kept_neurons
from mlpfuse.stages.math.refit import RefitAccumulator
from mlpfuse.stages.methods.base import BuildContext
from mlpfuse.stages.model.overlay import ff_patch

MEASURE = "KL of the next-token distribution from the base model's, nats per token (calibration tokens)"


class DamageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Calibration tokens the end-to-end measurements run on (whole calibration blocks, the first).
    tokens: int = Field(1024, ge=16)
    # Kept fractions j / steps, j = 1..steps (24: every 64 neurons of a 1536-wide block).
    steps: int = Field(24, ge=2, le=256)
    # The fraction measured end to end (the nearest grid point); the planner's budgets mostly fall
    # between 0.5 and 0.9.
    reference: float = Field(0.625, gt=0, lt=1)
    lam: float = Field(1e-3, ge=0)  # the ridge refit's (relative) λ
    batch_size: int = Field(4, ge=1)


def fractions(cfg: DamageConfig) -> list[float]:
    return [j / cfg.steps for j in range(1, cfg.steps + 1)]


def _block_errors(ctx: BuildContext, i: int, cfg: DamageConfig) -> tuple[list[float], dict]:
    """Layer i's FF error ‖Ŷ − Y‖² / ‖Y‖² (all its blocks together) at every grid fraction, from
    collect's HᵀH, and the blocks built at the reference fraction."""
    sse = np.zeros(cfg.steps)
    total = 0.0
    ref_j = _reference_index(cfg)
    built = {}
    for ref in ctx.refs(i):
        ff = ctx.block(i, ref)
        st = ctx.stats(i, "the damage curves").get(ref.name, {})
        if "hidden.gram" not in st:
            raise InputError(f"damage needs collect's HᵀH of layer {i} {ref.name} ({ff.intermediate_size} neurons): "
                             "collect with gram_max at least the FF width")
        n = int(st["count"][0])
        if not n:
            continue  # an expert no calibration token reached: it adds nothing to the output
        gram, hsum = torch.from_numpy(st["hidden.gram"]), torch.from_numpy(st["hidden.sum"])
        scores = activation_scores(ff, torch.from_numpy(ctx.energy(i, ref)).float())
        # The whole block's statistics once; each width's are a slice of them.
        full = RefitAccumulator.from_gram(gram, hsum, n, torch.arange(ff.intermediate_size), ff.down, ff.b_down,
                                          bias=ff.b_down is not None)
        for j, f in enumerate(fractions(cfg)):
            kept = kept_neurons(scores, max(1, math.floor(f * ff.intermediate_size + 1e-9)))
            acc = full.select(kept)
            w, b = acc.solve(cfg.lam)
            sse[j] += acc.sse(w, b)
            if j == ref_j:
                built[ref] = replace(ff.select(kept), down=w.float(), b_down=None if b is None else b.float())
        total += full.yty
    return (sse / max(total, 1e-30)).tolist(), built


def _reference_index(cfg: DamageConfig) -> int:
    return min(range(cfg.steps), key=lambda j: abs((j + 1) / cfg.steps - cfg.reference))


# Sums in NumPy (as the refit statistics'): one fixed order, whatever the worker's thread count. The
# last bit of the float64 solves still follows it (a Ray worker reused from a 1-CPU task has one
# torch thread), so two computations of this artifact can differ in a figure's last digit.


def _kl(base_logp: Tensor, logits: Tensor) -> float:
    """Σ over positions of KL(base ‖ candidate)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    per_token = (base_logp.exp() * (base_logp - logq)).double()
    return float(np.sum(per_token.cpu().numpy()))


def run(config: DamageConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard``, ``collect`` (HᵀH of every block), ``data`` (the calibration tokens)."""
    from tqdm import tqdm

    ctx = BuildContext(inputs["shard"], inputs["collect"], inputs["data"])
    model = ctx.model
    if not model.family.causal:
        raise InputError("damage measures next-token distributions: a causal language model is needed")
    calib = read_calib(inputs["data"])
    blocks = calib[: max(1, math.ceil(config.tokens / calib.shape[1]))]
    n_tok = int(blocks.size)
    states = [model.start(torch.from_numpy(blocks[b : b + config.batch_size]))
              for b in range(0, len(blocks), config.batch_size)]
    layer_in: list[list[Tensor]] = []
    for i in tqdm(range(model.num_layers), desc="damage: base", unit="layer"):
        layer_in.append([s.hidden.clone() for s in states])
        with model.layer(i) as layer:
            for s in states:
                s.hidden = model.apply(layer, i, s)
    base_logp = [torch.log_softmax(model.finish(s).float(), dim=-1) for s in states]

    rows = []
    for i in tqdm(range(model.num_layers), desc="damage", unit="layer"):
        sse, built = _block_errors(ctx, i, config)
        base = model.layer_state(i)
        patched = {**base, **ff_patch(ctx.family, ctx.config, base, {r: b.to(ctx.dtype) for r, b in built.items()})}
        pruned = [s.hidden for s in states]  # placeholders, replaced below
        with model.layer(i, patched) as layer:
            for b, s in enumerate(states):
                s.hidden = layer_in[i][b]
                pruned[b] = model.apply(layer, i, s)
        dropped = [h.clone() for h in layer_in[i]]
        for j in range(i + 1, model.num_layers):
            with model.layer(j) as layer:
                for b, s in enumerate(states):
                    s.hidden = pruned[b]
                    pruned[b] = model.apply(layer, j, s)
                    s.hidden = dropped[b]
                    dropped[b] = model.apply(layer, j, s)
        kl_ref = kl_drop = 0.0
        for b, s in enumerate(states):
            s.hidden = pruned[b]
            kl_ref += _kl(base_logp[b], model.finish(s))
            s.hidden = dropped[b]
            kl_drop += _kl(base_logp[b], model.finish(s))
        kl_ref, kl_drop = kl_ref / n_tok, kl_drop / n_tok
        ref_j = _reference_index(config)
        scale = kl_ref / sse[ref_j] if sse[ref_j] > 0 else 0.0
        # At the full width the layer is not compressed at all: no damage.
        rows.append({"layer": i, "sse": sse, "reference": fractions(config)[ref_j], "kl_reference": kl_ref,
                     "kl_drop": kl_drop, "damage": [scale * e for e in sse[:-1]] + [0.0]})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "damage.json", {"fractions": fractions(config), "tokens": n_tok, "measure": MEASURE,
                                                "layers": rows})
    return {"layers": len(rows), "tokens": n_tok,
            "kl_reference": [r["kl_reference"] for r in rows], "kl_drop": [r["kl_drop"] for r in rows]}


def read_damage(out_dir: Path) -> dict:
    import json

    return json.loads((out_dir / "damage.json").read_text())
