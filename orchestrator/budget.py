"""A size budget -> candidates of every method -> successive halving -> the winner, honestly.

Given ``target: {params: 0.8}`` the planner lists every candidate that can meet it — the papers'
methods (MLP Fusion, FF merging, MLPMoE) and the baselines a user would otherwise pick
(activation-aware, structured-OBS, magnitude and random neuron pruning, layer drop, and a layer drop + pruning
combination), each with and without the least-squares refit — builds them (cached compress
stages), and scores them by successive halving over held-out tokens: every candidate on a small
token budget, the better half again on twice the tokens, until one is left at the full budget.
The windows of a smaller budget are a prefix of a larger one's, so a round scores only the
windows its survivors have not been scored on and adds their sums to the previous round's: each
finalist costs one full evaluation in all, and its score is that evaluation's.

Parameters are counted as the user will load the model: with the default stock export, what plain
``transformers`` materialises (one FF size for all layers, so smaller layers are zero-padded and
tied windows are copies); with ``export: tied``, unique stored parameters (needs ``mlpfuse.load``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlpfuse.core.errors import InputError
from mlpfuse.stages.compress import CompressConfig
from mlpfuse.stages.damage import DamageConfig
from mlpfuse.stages.methods import METHODS, predict_shapes
from mlpfuse.stages.methods.drop import map_foldable
from mlpfuse.stages.methods.refit import RefitConfig
from mlpfuse.stages.model.features import read_stats
from mlpfuse.stages.model.params import BaseShapes, base_blocks, count_params

# The registry's methods, and "combo" (layer drop + pruning of the rest), in the planner's order.
METHOD_FAMILIES = (*METHODS, "combo")


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A fraction (< 1) of the base model's parameters, or an absolute count (> 1).
    params: float | None = Field(None, gt=0)
    ff_params: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> TargetSpec:
        if (self.params is None) == (self.ff_params is None):
            raise ValueError("give exactly one of params or ff_params")
        value = self.params if self.params is not None else self.ff_params
        assert value is not None
        if value >= 1 and not float(value).is_integer() or value == 1:
            raise ValueError(
                f"budget {value} is not smaller than the model: give a fraction below 1 (e.g. 0.8) "
                "or an absolute parameter count"
            )
        return self


class HalvingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_tokens: int = Field(512, ge=16)
    factor: int = Field(2, ge=2)


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: TargetSpec
    methods: tuple[str, ...] = METHOD_FAMILIES
    # Candidates are built without and, when set, with the refit: one refit, or several (e.g.
    # ``[{mode: down}, {mode: block}]``: each candidate then comes with each). Names: "+refit"
    # (the down-only ridge), "+blockfit" (the whole block).
    refit: RefitConfig | tuple[RefitConfig, ...] | None = RefitConfig()
    # Layers kept whole by the "protected" allocation variant (first N, last M); they only pay
    # off with export: tied (stock transformers needs one FF size for every layer).
    protect_first: int = Field(2, ge=0)
    protect_last: int = Field(1, ge=0)
    halving: HalvingSpec = HalvingSpec()
    # Candidates start from the base model's cached hidden states at their first changed layer.
    share_prefix: bool = True
    # Per-layer reconstruction and NTK errors of each method's best candidate, in the report.
    layer_errors: bool = True
    export: Literal["stock", "tied"] = "stock"
    # How candidates are ranked, from each held-out set's perplexity ratio to the base model's on
    # the same windows: the worst set's ratio (default), the geometric mean of the ratios, or the
    # perplexity over all sets' tokens together.
    rank: Literal["worst_ratio", "mean_ratio", "perplexity"] = "worst_ratio"
    # Allocation from measured damage (the damage stage: each layer's KL from the base model when
    # pruned alone to each width, or dropped; two partial forwards a layer): the budget solved over
    # the layers, the best allocations sent to halving beside the uniform ones. None: off.
    damage: DamageConfig | None = None
    # Extra candidates given by hand (any method and settings).
    candidates: tuple[CompressConfig, ...] = ()

    def refits(self) -> tuple[RefitConfig, ...]:
        if self.refit is None:
            return ()
        return (self.refit,) if isinstance(self.refit, RefitConfig) else self.refit

    @model_validator(mode="after")
    def _one_refit_per_mode(self) -> BudgetSpec:
        modes = [r.mode for r in self.refits()]
        if len(set(modes)) != len(modes):
            raise ValueError(f"refit: one per mode (got modes {modes}); candidates are named by it")
        return self

    @model_validator(mode="after")
    def _known_methods(self) -> BudgetSpec:
        unknown = [m for m in self.methods if m not in METHOD_FAMILIES]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; methods: {', '.join(METHOD_FAMILIES)}")
        return self


@dataclass
class Candidate:
    name: str
    config: CompressConfig
    family: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    custom: bool = False  # given by hand in ``budget.candidates``
    # Parameters (as the budget counts them) predicted from the settings before the build; None
    # where only the build can tell. The built count is checked against the budget all the same.
    predicted: int | None = None
    # The damage allocation's prediction (the sum of its layers' measured damages, KL nats per token).
    predicted_damage: float | None = None


@dataclass
class ModelFacts:
    """What the planner needs to size candidates, read from the shard and collect artifacts."""

    num_layers: int
    params: int
    ff_params: int
    layer_params: list[int]
    ff_layer_params: list[int]
    cos: list[float]  # mean cos(layer input, layer output) on calibration tokens
    # The shard's parameter counts (shard.json "params") and every layer's FF block shapes (from
    # the layer files' headers): what the budget is checked with before building.
    base: dict[str, Any] = field(default_factory=dict)
    shapes: BaseShapes | None = None
    # Whether collect kept every block's HᵀH (gram_max at least the FF widths): what structured
    # OBS pruning reads.
    gram: bool = False
    # Whether a fitted linear map folds into a layer's FF (ReplaceMe's layer drop).
    map_foldable: bool = False
    # The damage stage's curves (damage.json), where the budget asks for the damage allocation.
    damage: dict[str, Any] | None = None

    @classmethod
    def read(cls, shard_dir: Path, collect_dir: Path) -> ModelFacts:
        p = json.loads((shard_dir / "shard.json").read_text())["params"]
        shapes = base_blocks(shard_dir)
        n = len(p["layers"])
        cos = []
        gram = True
        for i in range(n):
            stats = read_stats(collect_dir, i)
            st = stats.get("layer")
            if st is None:
                raise ValueError(f"collect artifact {collect_dir} has no layer statistics (written by an older version)")
            cos.append(float(st["cos.sum"][0] / max(st["count"][0], 1)))
            gram = gram and all("hidden.gram" in b for name, b in stats.items() if "hidden.sum" in b)
        return cls(n, p["total"], p["ff"], p["layers"], p["ff_layers"], cos, p, shapes, gram,
                   map_foldable(shard_dir))


def target_params(target: TargetSpec, facts: ModelFacts) -> tuple[str, int]:
    """("params" | "ff_params", absolute budget); errors name the value that cannot work."""
    kind, value = ("params", target.params) if target.params is not None else ("ff_params", target.ff_params)
    base = facts.params if kind == "params" else facts.ff_params
    assert value is not None
    budget = int(value * base) if value < 1 else int(value)
    if budget >= base:
        raise InputError(f"target {kind}: {value} is not smaller than the model ({base:,} {kind}); nothing to remove")
    return kind, budget


def refit_suffix(refit: RefitConfig | None) -> str:
    """A candidate's name suffix for its refit: none, "+refit" (down-only ridge), "+blockfit"."""
    return "" if refit is None else "+refit" if refit.mode == "down" else "+blockfit"


def plan_candidates(spec: BudgetSpec, facts: ModelFacts, size_multiple: dict[str, int] | None = None,
                    width_multiple: int = 1) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Every candidate that can meet the budget, and the method families that cannot (with why);
    ``size_multiple``: the export's width multiples, counted against the budget; ``width_multiple``:
    pruned and fused widths are rounded down to multiples of it (``export.multiple_of``)."""
    kind, budget = target_params(spec.target, facts)
    base = facts.params if kind == "params" else facts.ff_params
    remove = base - budget
    n = facts.num_layers
    cands: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    refits: list[RefitConfig | None] = [None, *spec.refits()]

    def add(name: str, family: str, candidate: dict[str, Any], drop: list[int] | None = None) -> list[Candidate]:
        new = []
        for r in refits:
            if r is not None and not METHODS[candidate["method"]].refit:
                continue  # nothing to refit
            cfg = CompressConfig.model_validate({"candidate": candidate, "refit": r, "drop": drop or ()})
            new.append(Candidate(name + refit_suffix(r), cfg, family))
        cands.extend(new)
        return new

    all_layers = list(range(n))
    protected = list(range(spec.protect_first, n - spec.protect_last))
    allocations = {"uniform": all_layers}
    if spec.export == "tied" and protected and protected != all_layers:
        allocations["protected"] = protected

    def keep_ratio(layers: list[int], extra_removed: int = 0) -> float | None:
        ff = sum(facts.ff_layer_params[i] for i in layers)
        need = remove - extra_removed
        if need <= 0:
            return 1.0
        ratio = math.floor((1 - need / ff) * 4096) / 4096 if ff else -1  # round down: meet the budget
        return ratio if ratio > 0 else None

    width_families = [f for f in ("prune", "fusion", "moefy") if f in spec.methods]
    mult = {"multiple_of": width_multiple} if width_multiple > 1 else {}
    for alloc, layers in allocations.items():
        ratio = keep_ratio(layers)
        if ratio is None:
            for f in width_families:
                skipped.append({"method": f, "why": f"removing {remove:,} {kind} from the FF blocks of "
                                f"{len(layers)} layers ({alloc}) would remove every neuron"})
            continue
        if "prune" in spec.methods:
            # Structured OBS reads collect's HᵀH of every block (it compensates as it removes).
            for crit in ("activation", "magnitude", "random") + (("obs",) if facts.gram else ()):
                add(f"prune-{crit}-{alloc}", "prune", {"method": "prune", "criterion": crit, "ratio": ratio,
                                                      "layers": layers, **mult})
            if alloc == "uniform" and spec.export == "tied":  # per-layer sizes pay off only when tied
                add("prune-activation-sensitivity", "prune", {"method": "prune", "criterion": "activation",
                                                              "ratio": ratio, "allocation": "sensitivity"})
        if "fusion" in spec.methods:
            # k-means++ starts close to converged; 10 Lloyd iterations keep 30 layers × 3 variants cheap.
            fuse = {"method": "fusion", "ratio": ratio, "layers": layers, "iters": 10, **mult}
            add(f"fusion-{alloc}", "fusion", fuse)
            add(f"fusion-energy-{alloc}", "fusion", {**fuse, "weighting": "energy"})
            add(f"cluster-{alloc}", "fusion", {**fuse, "mode": "cluster"})
        if "moefy" in spec.methods:
            branches = 8
            keep_b = math.floor(ratio * branches) / branches
            if keep_b > 0:
                add(f"moefy-compensated-{alloc}", "moefy", {"method": "moefy", "branches": branches,
                    "assignment": "activation", "op": "compensated", "keep_branches": keep_b, "layers": layers})
            add(f"moefy-fade-{alloc}", "moefy", {"method": "moefy", "branches": branches, "assignment": "activation",
                "op": "fade", "sparsity": round(1 - ratio, 6), "layers": layers})

    # Whole-layer drop: the layers that change the hidden state least (highest cos(in, out)).
    order = [i for i in np.argsort(facts.cos)[::-1].tolist() if 0 < i < n - 1]
    if "layer_drop" in spec.methods or "combo" in spec.methods:
        dropped, freed = [], 0
        for i in order:
            if freed >= remove:
                break
            dropped.append(i)
            freed += facts.layer_params[i] if kind == "params" else facts.ff_layer_params[i]
        if freed >= remove and "layer_drop" in spec.methods:
            add(f"layer-drop-{len(dropped)}", "layer_drop", {"method": "layer_drop", "layers": sorted(dropped)})
            # ReplaceMe: the same layers, each run of them replaced by a fitted linear map folded
            # into the layer before it (on SmolLM2 this beat one contiguous run of as many layers:
            # benchmarks/README.md, layer_drop_map.py).
            if facts.map_foldable:
                add(f"layer-drop-{len(dropped)}-map", "layer_drop",
                    {"method": "layer_drop", "layers": sorted(dropped), "linear_map": True})
        elif "layer_drop" in spec.methods:
            skipped.append({"method": "layer_drop", "why": "dropping every middle layer does not meet the budget"})
        if "combo" in spec.methods and len(dropped) >= 2:
            half = sorted(dropped[: len(dropped) // 2])
            freed_half = sum(facts.layer_params[i] if kind == "params" else facts.ff_layer_params[i] for i in half)
            rest = [i for i in all_layers if i not in half]
            ratio = keep_ratio(rest, freed_half)
            if ratio is not None and ratio < 1:
                add(f"combo-drop{len(half)}-prune", "combo",
                    {"method": "prune", "criterion": "activation", "ratio": ratio, "layers": rest, **mult}, drop=half)

    if facts.damage is not None and "prune" in spec.methods:
        _damage_candidates(spec, facts, remove, kind, keep_ratio, add, mult)

    if "ff_drop" in spec.methods:
        # FF sublayers only (attention kept), in the same order as whole layers. Stock configs have
        # one FF size for every layer, so a removed FF sublayer saves loaded parameters only in
        # the tied form (per-layer sizes, mlpfuse.load).
        if spec.export != "tied":
            skipped.append({"method": "ff_drop", "why": "the stock export zero-pads a removed FF sublayer to the "
                            "common FF size, so it saves no loaded parameters; use export: tied"})
        else:
            dropped, freed = [], 0
            for i in order:
                if freed >= remove:
                    break
                dropped.append(i)
                freed += facts.ff_layer_params[i]
            if freed >= remove:
                add(f"ff-drop-{len(dropped)}", "ff_drop", {"method": "ff_drop", "layers": sorted(dropped)})
            else:
                skipped.append({"method": "ff_drop", "why": "dropping every middle FF sublayer does not meet the budget"})
    if "merge" in spec.methods:
        if spec.export != "tied":
            skipped.append({"method": "merge", "why": "tied windows are materialised as copies in the stock "
                            "export, so merging saves no loaded parameters; use export: tied"})
        else:
            per_layer = max(facts.ff_layer_params)
            size = 1 + math.ceil(remove / per_layer)
            if size > n:
                skipped.append({"method": "merge", "why": f"would need a window of {size} > {n} layers"})
            else:
                # FF sublayers of different shapes (dense and MoE layers) do not merge.
                starts = [s for s in range(0, n - size + 1)
                          if len({facts.ff_layer_params[i] for i in range(s, s + size)}) == 1]
                if not starts:
                    skipped.append({"method": "merge", "why": f"no window of {size} layers has FF sublayers of one shape"})
                for start in starts:
                    for permute in (True, False):
                        add(f"merge-{start}-{start + size - 1}" + ("" if permute else "-vanilla"), "merge",
                            {"method": "merge", "start": start, "size": size, "permute": permute})
    for j, c in enumerate(spec.candidates):
        method = c.candidate.method
        family = "combo" if c.drop and method == "prune" else method  # as the planner names its own
        cands.append(Candidate(f"custom-{j}-{method}", c, family, custom=True))
    cands = _within_budget(cands, skipped, facts, spec.export, kind, budget, size_multiple)
    if not cands:
        reasons = "; ".join(f"{s['method']}: {s['why']}" for s in skipped) or "no method selected"
        value = spec.target.params if spec.target.params is not None else spec.target.ff_params
        raise InputError(f"no method can meet target {kind}: {value} ({budget:,} of {base:,}): {reasons}")
    return cands, skipped


def _damage_candidates(spec: BudgetSpec, facts: ModelFacts, remove: int, kind: str, keep_ratio: Any, add: Any,
                       mult: dict[str, int]) -> None:
    """Candidates from the measured damage curves (orchestrator/allocation.py). Stock export: one
    kept fraction for every layer, so what the curves decide is which layers to drop; the two
    cheapest allocations that drop any are candidates (dropping none is the uniform candidate,
    already planned). Tied export: per-layer fractions, without and with drops."""
    from mlpfuse.orchestrator.allocation import free_allocation, stock_allocations

    assert facts.damage is not None
    prune = {"method": "prune", "criterion": "activation"}
    if spec.export == "stock":
        with_drops = [a for a in stock_allocations(facts.damage, facts, remove, kind, keep_ratio)
                      if a.dropped and a.fractions]  # drops alone: the layer-drop candidates
        for a in with_drops[:2]:
            rest = sorted(a.fractions)
            ratio = a.fractions[rest[0]]
            for c in add(f"combo-damage-drop{len(a.dropped)}-prune", "combo",
                         {**prune, "ratio": ratio, "layers": rest, **mult}, drop=list(a.dropped)):
                c.predicted_damage = a.damage
        return
    for drops in (False, True):
        free = free_allocation(facts.damage, facts, remove, kind, drops)
        if free is None or (drops and not free.dropped) or not free.fractions:
            continue
        for c in add("prune-damage" + (f"-drop{len(free.dropped)}" if drops else ""), "prune",
                     {**prune, "ratio": min(free.fractions.values()), "layers": sorted(free.fractions),
                      "layer_ratio": free.fractions}, drop=list(free.dropped)):
            c.predicted_damage = free.damage


def counted_keys(export: str) -> tuple[str, str]:
    """The count keys (all parameters, FF parameters) the budget compares for an export form: the
    tied form stores each tied tensor once."""
    return ("unique_params", "unique_ff_params") if export == "tied" else ("params", "ff_params")


def _within_budget(cands: list[Candidate], skipped: list[dict[str, str]], facts: ModelFacts, export: str,
                   kind: str, budget: int, size_multiple: dict[str, int] | None) -> list[Candidate]:
    """The candidates whose predicted size meets the budget (counted by the same function compress
    and export count with); the others go to ``skipped`` without being built."""
    key = counted_keys(export)[0 if kind == "params" else 1]
    out = []
    for c in cands:
        shapes = None if facts.shapes is None else predict_shapes(
            c.config.candidate, c.config.drop, facts.shapes.blocks, facts.shapes.moe_layers)
        if shapes is not None:
            blocks, skip, tied = shapes
            c.predicted = count_params(facts.base, blocks, skip, tied, size_multiple=size_multiple)[key]
            if c.predicted > budget:
                skipped.append({"method": c.name, "why": f"predicted at {c.predicted:,} {kind}, over the budget "
                                f"{budget:,} (not built)"})
                continue
        out.append(c)
    return out


def halving_budgets(n_candidates: int, full_tokens: int, spec: HalvingSpec) -> list[int]:
    """Token budgets of the rounds: grow by ``factor`` up to the full budget, with the number of
    rounds the candidate count needs to come down to one."""
    rounds = max(1, math.ceil(math.log(max(n_candidates, 1), spec.factor)) + 1)
    budgets = [min(full_tokens, spec.min_tokens * spec.factor**r) for r in range(rounds)]
    budgets[-1] = full_tokens
    return sorted(set(budgets))


def add_set_sums(prev: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-set sums of an earlier round plus a round's increment, with each set's perplexity and,
    where the base model's NLL on the same windows is known, its ratio to the base, mean KL from
    the base's next-token distribution and top-1 agreement."""
    out = {}
    for name, st in new.items():
        acc = {k: v + prev.get(name, {}).get(k, 0) for k, v in st.items() if k.endswith("_sum") or k == "tokens"}
        n = max(acc.get("tokens", 0), 1)
        acc["perplexity"] = math.exp(acc["nll_sum"] / n)
        if "base_nll_sum" in acc:
            acc["base_perplexity"] = math.exp(acc["base_nll_sum"] / n)
            acc["ratio"] = math.exp((acc["nll_sum"] - acc["base_nll_sum"]) / n)
            acc["kl"] = acc["kl_sum"] / n
            acc["top1"] = acc["top1_sum"] / n
        out[name] = acc
    return out


def rank_score(round_: dict[str, Any], rule: str) -> float:
    """A round's score under the ranking rule (lower is better); without per-set ratios (no base
    reference), the perplexity."""
    ratios = [s["ratio"] for s in (round_.get("sets") or {}).values() if "ratio" in s]
    if rule == "perplexity" or not ratios:
        return float(round_["perplexity"])
    if rule == "worst_ratio":
        return max(ratios)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


RANK_WORDS = {"worst_ratio": "worst held-out set's perplexity ratio to the base",
              "mean_ratio": "geometric mean of the held-out sets' perplexity ratios to the base",
              "perplexity": "perplexity"}


def winner_reason(winner: Candidate, cands: list[Candidate], base_ppl: float, rule: str = "perplexity") -> str:
    """One paragraph: why the winner won, and how the papers' methods scored at this size."""
    final = winner.rounds[-1]
    ratio = final["perplexity"] / base_ppl
    papers = {"fusion": "MLP Fusion", "merge": "FF merging", "moefy": "MLPMoE"}
    best_of: dict[str, Candidate] = {}

    def rank(c: Candidate) -> tuple[int, float]:  # the furthest round first: scores on more tokens
        return -len(c.rounds), c.rounds[-1].get("score", c.rounds[-1]["perplexity"])

    for c in cands:
        if c.family in papers and c.rounds:
            prev = best_of.get(c.family)
            if prev is None or rank(c) < rank(prev):
                best_of[c.family] = c
    per_set = [f"{n} {st['ratio']:.2f}×" for n, st in (final.get("sets") or {}).items() if "ratio" in st]
    if per_set and rule != "perplexity":
        parts = [f"{winner.name} won on the {RANK_WORDS[rule]}, {final['score']:.3f} (per set: {', '.join(per_set)}; "
                 f"perplexity {final['perplexity']:.3f} over all {final['tokens']} held-out tokens, {ratio:.2f}× the "
                 f"base {base_ppl:.3f}), the lowest of {len(cands)} candidates that meet the budget"]
    else:
        parts = [f"{winner.name} won with perplexity {final['perplexity']:.3f} ({ratio:.2f}× the base "
                 f"{base_ppl:.3f}) on {final['tokens']} held-out tokens, the lowest of {len(cands)} candidates "
                 "that meet the budget"]
    if best_of:
        score = "" if rule == "perplexity" else "score {:.3f}, perplexity "
        desc = ", ".join(f"{papers[f]} best {c.name} at {score.format(c.rounds[-1].get('score', 0.0))}"
                         f"{c.rounds[-1]['perplexity']:.3f} (on {c.rounds[-1]['tokens']} tokens)"
                         for f, c in sorted(best_of.items()))
        parts.append(f"the papers' methods scored: {desc}")
    if winner.family not in papers:
        parts.append("a baseline beat the papers' methods at this size")
    return "; ".join(parts) + "."
