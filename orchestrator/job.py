"""The main job: base stages, then (with a budget) candidates of every method, successive
halving, the winner exported, and the report."""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from mlpfuse.orchestrator.budget import (
    Candidate,
    ModelFacts,
    add_set_sums,
    counted_keys,
    halving_budgets,
    plan_candidates,
    rank_score,
    target_params,
    winner_reason,
)
from mlpfuse.orchestrator.pipeline import PlanNode, Session, build_plan, make_node
from mlpfuse.orchestrator.report import build_report, write_report
from mlpfuse.orchestrator.spec import PipelineSpec
from mlpfuse.orchestrator.store import ArtifactStore
from mlpfuse.stages.damage import DamageConfig
from mlpfuse.stages.export import ExportConfig
from mlpfuse.stages.model.params import recount

log = logging.getLogger("mlpfuse.job")


def _round_nodes(session: Session, spec: PipelineSpec, alive: list[Candidate], r: int, tokens: int, after: int,
                 prefix: dict[str, str]) -> list:
    """Round r's evaluation of every surviving candidate: only the windows beyond the ``after``
    tokens the candidate was already scored on (its earlier rounds' windows are a prefix)."""
    ev = spec.evaluate.model_copy(update={"max_tokens": tokens, "after_tokens": after})
    return [
        make_node(session.keys, f"evaluate.{c.name}.r{r}", "evaluate", ev,
                  {"shard": "shard", "data": "data", "overlay": f"compress.{c.name}", "reference": "evaluate",
                   **prefix})
        for c in alive
    ]


def _share_prefix(session: Session, spec: PipelineSpec, alive: list[Candidate], rounds: list[int]) -> dict[str, str]:
    """Cache the base model's hidden states entering each candidate's first changed layer (one
    base pass over the evaluation windows); returns the evaluate nodes' extra input. Skipped unless
    the first round alone is sure to save more layer-forwards than the pass costs (e.g.
    when only a few candidates leave the first layers alone)."""
    from mlpfuse.stages.evaluate import PrefixConfig
    from mlpfuse.stages.model.overlay import first_changed_layer

    first = [first_changed_layer(session.path(f"compress.{c.name}")) or 0 for c in alive]
    starts = sorted(set(first) - {0})
    if not starts or sum(first) * rounds[0] <= max(starts) * rounds[-1]:
        return {}
    cfg = PrefixConfig(**spec.evaluate.model_dump(), layers=tuple(starts))
    session.run([make_node(session.keys, "prefix", "prefix", cfg, {"shard": "shard", "data": "data"})])
    return {"prefix": "prefix"}


def _layer_errors(session: Session, spec: PipelineSpec, cands: list[Candidate]) -> dict[str, Any]:
    """Per-layer reconstruction and NTK errors (held-out probe tokens, the original model's FF
    inputs) of the best candidate of each method family that changes FF blocks, and of every
    candidate given by hand."""
    from mlpfuse.orchestrator.layer_errors import score_layers

    best: dict[str, Candidate] = {}
    for c in cands:
        group = c.name if c.custom else c.family
        if c.rounds and c.config.candidate.method != "layer_drop" and (
                group not in best or c.rounds[-1]["perplexity"] < best[group].rounds[-1]["perplexity"]):
            best[group] = c
    if not best:
        return {}
    out = score_layers(session, spec, list(best.values()))
    return {"layer_errors": out["recon"], "ntk_errors": out["ntk"], "ntk_sign_errors": out["ntk_sign"]}


def run_budget(session: Session, spec: PipelineSpec) -> dict[str, Any]:
    """Plan, build and score candidates; returns the report's budget section and the winner."""
    assert spec.budget is not None
    damage = None
    if spec.budget.damage is not None:  # each layer's measured damage, before planning
        session.run([_damage_node(session.keys, spec.budget.damage)])
        damage = session.path("damage")
    facts, kind, budget, multiple, cands, skipped = _planned(spec, session.path("shard"), session.path("collect"),
                                                             damage)
    t0 = time.time()
    # Refit candidates start from their un-refit twin (the same settings without refit, built
    # first), so nothing is clustered twice.
    plain = [c for c in cands if c.config.refit is None]
    twins = {c.config.model_dump_json(): c.name for c in plain}
    def inputs_of(c: Candidate) -> dict[str, str]:
        return {"shard": "shard", "collect": "collect", **({"data": "data"} if c.config.reads_tokens else {})}

    built = session.run([make_node(session.keys, f"compress.{c.name}", "compress", c.config, inputs_of(c))
                         for c in plain])
    refits = []
    for c in cands:
        if c.config.refit is not None:
            twin = twins.get(c.config.model_copy(update={"refit": None}).model_dump_json())
            inputs = inputs_of(c)
            if twin is not None:
                inputs["unrefit"] = f"compress.{twin}"
            refits.append(make_node(session.keys, f"compress.{c.name}", "compress", c.config, inputs))
    built.update(session.run(refits))
    counted, counted_ff = counted_keys(spec.budget.export)
    alive = []
    for c in cands:
        b = built[f"compress.{c.name}"]
        # Counted as the export will store it (its width multiples), by the one count function.
        assert facts.shapes is not None
        c.result = {**b["result"], **recount(facts.base, facts.shapes, b["result"], multiple)}
        c.key = b["key"]
        size = c.result[counted if kind == "params" else counted_ff]
        if c.predicted is not None and c.predicted != size:
            log.warning("%s: built at %s %s, predicted %s", c.name, f"{size:,}", kind, f"{c.predicted:,}")
        if size <= budget:
            alive.append(c)
        else:
            skipped.append({"method": c.name, "why": f"built at {size:,} {kind}, over the budget {budget:,}"})
    if not alive:
        from mlpfuse.core.errors import InputError

        raise InputError(f"no candidate meets the budget of {budget:,} {kind}")
    base_eval = session.results["evaluate"]["result"]
    # Round budgets count tokens per held-out set (each set is windowed alone).
    full = max((st["tokens"] for st in (base_eval.get("sets") or {}).values()), default=base_eval["tokens"])
    rounds = halving_budgets(len(alive), full, spec.budget.halving)
    prefix = _share_prefix(session, spec, alive, rounds) if spec.budget.share_prefix else {}
    num_layers = facts.num_layers
    budgets = [spec.evaluate.max_tokens if r == len(rounds) - 1 else t for r, t in enumerate(rounds)]
    for r, tokens in enumerate(budgets):
        last = r == len(rounds) - 1
        # The last round scores the full budget: exactly the tokens the base model was scored on.
        # Each round scores only the windows the previous one did not, and adds the sums up.
        res = session.run(_round_nodes(session, spec, alive, r, tokens, budgets[r - 1] if r else 0, prefix))
        for c in alive:
            m = res[f"evaluate.{c.name}.r{r}"]["result"]
            nll_sum, count = m["nll_sum"], m["tokens"]
            if c.rounds:
                nll_sum, count = nll_sum + c.rounds[-1]["nll_sum"], count + c.rounds[-1]["tokens"]
            sets = add_set_sums(c.rounds[-1]["sets"] if c.rounds else {}, m.get("sets", {}))
            c.rounds.append({"tokens": count, "perplexity": math.exp(nll_sum / max(count, 1)), "nll_sum": nll_sum,
                             "sets": sets, "seconds": res[f"evaluate.{c.name}.r{r}"]["seconds"],
                             "start_layer": m.get("start_layer", 0), "layer_tokens": m.get("layer_tokens")})
            c.rounds[-1]["score"] = rank_score(c.rounds[-1], spec.budget.rank)
        alive.sort(key=lambda c: c.rounds[-1]["score"])
        if not last:
            alive = alive[: max(1, math.ceil(len(alive) / spec.budget.halving.factor))]
    winner = alive[0]
    base_ppl = session.results["evaluate"]["result"]["perplexity"]
    errors = _layer_errors(session, spec, cands) if spec.budget.layer_errors else {}
    evaluations = sum(len(c.rounds) for c in cands)
    done = [x for c in cands for x in c.rounds if x.get("layer_tokens") is not None]
    layer_tokens = sum(x["layer_tokens"] for x in done)
    # The same evaluations, every one run from layer 0 (what prefix sharing saved).
    unshared = sum(x["layer_tokens"] * num_layers // max(num_layers - x["start_layer"], 1) for x in done)
    prefix_cost = session.results["prefix"]["result"]["layer_tokens"] if prefix else 0
    return {
        "winner_candidate": winner,
        "budget": {"target": spec.budget.target.model_dump(exclude_none=True), "kind": kind, "budget": budget,
                   "export": spec.budget.export, "rounds": rounds, "evaluations": evaluations,
                   "layer_tokens": layer_tokens + prefix_cost, "layer_tokens_without_prefix": unshared,
                   "share_prefix": bool(prefix),
                   "seconds": round(time.time() - t0, 2)},
        "candidates": [
            {"name": c.name, "method": c.config.candidate.method, "family": c.family,
             "settings": c.config.model_dump(mode="json"), "params": c.result.get(counted),
             "ff_params": c.result.get(counted_ff), "predicted_params": c.predicted, "cache_key": c.key,
             "perplexity": c.rounds[-1]["perplexity"] if c.rounds else None,
             "score": c.rounds[-1]["score"] if c.rounds else None,
             "sets": c.rounds[-1]["sets"] if c.rounds else None, "rounds": c.rounds,
             "seconds": round(sum(x["seconds"] for x in c.rounds), 2), "refit_errors": c.result.get("refit_errors"),
             **({"predicted_damage": c.predicted_damage} if c.predicted_damage is not None else {})}
            for c in cands
        ],
        "skipped": skipped,
        **errors,
        "winner": {"name": winner.name, "params": winner.result.get(counted), "perplexity": winner.rounds[-1]["perplexity"],
                   "rank": spec.budget.rank, "score": winner.rounds[-1]["score"], "sets": winner.rounds[-1]["sets"],
                   "reason": winner_reason(winner, cands, base_ppl, spec.budget.rank)},
    }


def _samples(session: Session, spec: PipelineSpec, winner: Candidate) -> list[dict[str, str]]:
    """The base model's and the winner's greedy continuations of the same prompts, side by side."""
    cfg = spec.samples
    res = session.run([make_node(session.keys, "samples", "samples", cfg, {"shard": "shard"}),
                       make_node(session.keys, "samples.winner", "samples", cfg,
                                 {"shard": "shard", "overlay": f"compress.{winner.name}"})])
    base, won = (res[n]["result"]["prompts"] for n in ("samples", "samples.winner"))
    return [{"prompt": b["prompt"], "base": b["text"], "winner": w["text"]} for b, w in zip(base, won, strict=True)]


def _distill(session: Session, spec: PipelineSpec, winner: Candidate) -> dict[str, Any]:
    """Distil the exported winner against the original model, then score the result the same
    way as every candidate (sharded and evaluated on the held-out split)."""
    from mlpfuse.stages.model.checkpoint import resolve_source, source_key

    assert spec.distill is not None and spec.budget is not None
    cfg = spec.distill.model_copy(update={"tied": spec.budget.export == "tied"})
    teacher = make_node(session.keys, "export.teacher", "export", ExportConfig(), {"shard": "shard"})
    session.run([teacher])
    node = make_node(session.keys, "distill", "distill", cfg,
                     {"teacher": "export.teacher", "student": "export", "data": "data",
                      "overlay": f"compress.{winner.name}"})
    result = dict(session.run([node])["distill"]["result"])
    if result.get("overlay"):  # the trained layers as an overlay on the base shard (either form)
        ev = make_node(session.keys, "evaluate.distilled", "evaluate", spec.evaluate,
                       {"shard": "shard", "data": "data", "overlay": "distill", "reference": "evaluate"})
    elif not cfg.tied:  # every parameter trained: the stock form is a plain checkpoint, shard it
        model_dir = str(session.path("distill") / "model")
        shard_cfg = spec.shard_config(source_key(resolve_source(model_dir))).model_copy(update={"model": model_dir})
        session.run([make_node(session.keys, "shard.distilled", "shard", shard_cfg)])
        ev = make_node(session.keys, "evaluate.distilled", "evaluate", spec.evaluate,
                       {"shard": "shard.distilled", "data": "data", "reference": "evaluate"})
    else:
        result["note"] = ("trainable='all' on a tied export: the distilled model is not scored (no overlay "
                          "holds trained embeddings, and a tied checkpoint cannot be re-sharded)")
        return result
    scored = session.run([ev])["evaluate.distilled"]["result"]
    result["perplexity"] = scored["perplexity"]
    result["sets"] = add_set_sums({}, scored.get("sets", {}))
    result["perplexity_before"] = winner.rounds[-1]["perplexity"]
    return result


def publish(src: Path, dest: Path, files: dict[str, str] | None = None) -> None:
    """Copy the exported checkpoint out of the store (hard links where possible), with ``files``
    (name -> text) written beside it, then swap it in whole: each run writes its own temporary
    copy and renames it into place, so runs publishing to one output at once never see each
    other's half-written directory, and the last complete one stays."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        for name, text in (files or {}).items():
            (tmp / name).unlink(missing_ok=True)  # a hard link into the store: never write through it
            (tmp / name).write_text(text)
        while True:
            try:
                os.rename(tmp, dest)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = dest.with_name(f".{dest.name}.old.{uuid.uuid4().hex}")
            try:
                os.rename(dest, old)  # the previous output goes aside whole, then away
            except FileNotFoundError:
                continue  # another run moved it first
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_job(spec: PipelineSpec, store: ArtifactStore, force: set[str] | None = None) -> tuple[dict[str, Any], Path]:
    """Run everything the spec asks for; returns the report and where it was written."""
    t0 = time.time()
    session = Session(spec, store, force)
    extra: dict[str, Any] = {}
    try:
        session.run(build_plan(spec))
        if spec.budget is not None:
            out = run_budget(session, spec)
            winner: Candidate = out.pop("winner_candidate")
            extra.update(out)
            export_cfg = ExportConfig(tied=spec.budget.export == "tied",
                                      **spec.export.model_dump(exclude={"tied", "multiple_of"}))
            (node,) = [make_node(session.keys, "export", "export", export_cfg,
                                 {"shard": "shard", "overlay": f"compress.{winner.name}"})]
            session.run([node])
            extra["samples"] = _samples(session, spec, winner)
            final = session.path("export") / "model"
            if spec.distill is not None:
                extra["distill"] = _distill(session, spec, winner)
                before, after = extra["distill"].get("perplexity_before"), extra["distill"].get("perplexity")
                # Hand over the better model: distillation on a short budget can also make it worse.
                kept = after is None or before is None or after <= before
                extra["distill"]["kept"] = kept
                if kept:
                    final = session.path("distill") / "model"
                else:
                    extra["distill"]["note"] = (f"distillation raised held-out perplexity from {before:.3f} to "
                                                f"{after:.3f}; the undistilled winner is exported")
            dest = spec.output_dir() / "export"
            dest.parent.mkdir(parents=True, exist_ok=True)
            publish(final, dest, _handover_files(spec, session, winner, extra, final))
            extra["export"] = {**session.results["export"]["result"], "path": str(dest)}
    finally:
        session.close()
    report = build_report(spec, session, time.time() - t0)
    report.update(extra)
    path = write_report(report, spec.output_dir())
    from mlpfuse.orchestrator.report_html import write_html

    write_html(report, spec.output_dir())
    return report, path


def plan_budget(spec: PipelineSpec, store: ArtifactStore) -> tuple[list[dict[str, Any]], list[dict[str, str]],
                                                                    dict[str, Any] | None]:
    """The candidates a run of ``spec`` would build, without running or downloading anything:
    (candidates, skipped methods with why, the target as a count). Candidates are sized from the
    shard's parameter counts and collect's statistics, so they are listed once those two stages
    are cached locally; before that, only the families that will be planned are named."""
    if spec.budget is None:
        return [], [], None
    nodes = {n.name: n for n in build_plan(spec)}
    shard = store.get("shard", nodes["shard"].key, verify=False) if store.remote is None else None
    collect = store.get("collect", nodes["collect"].key, verify=False) if store.remote is None else None
    target = spec.budget.target.model_dump(exclude_none=True)
    if shard is None or collect is None:
        return [], [], {**target, "methods": list(spec.budget.methods),
                        "pending": "candidates are sized once the shard and collect stages are cached "
                                   "locally (mlpfuse run computes them)"}
    damage = None
    if spec.budget.damage is not None:
        node = _damage_node({n.name: n.key for n in nodes.values()}, spec.budget.damage)
        art = store.get("damage", node.key, verify=False)
        if art is None:
            target["damage"] = "the damage allocation's candidates are planned once the damage stage has run"
        else:
            damage = art.path
    facts, kind, budget, _, cands, skipped = _planned(spec, shard.path, collect.path, damage)
    return ([{"name": c.name, "family": c.family, "config": c.config.model_dump(mode="json"),
              "predicted": c.predicted} for c in cands],
            skipped, {**target, "kind": kind, "count": budget, "base": facts.params if kind == "params" else facts.ff_params})


def _damage_node(known: dict[str, str], config: DamageConfig) -> PlanNode:
    """The damage stage's node: what the damage allocation plans from (run before planning)."""
    return make_node(known, "damage", "damage", config, {"shard": "shard", "collect": "collect", "data": "data"})


def _planned(spec: PipelineSpec, shard_dir: Path, collect_dir: Path, damage_dir: Path | None = None) -> tuple[
        ModelFacts, str, int, dict[str, int], list[Candidate], list[dict[str, str]]]:
    """The budget as a count, the export's width multiples and the planned candidates (sized with
    them): what a run builds and what ``mlpfuse plan`` lists."""
    assert spec.budget is not None
    facts = ModelFacts.read(shard_dir, collect_dir)
    if damage_dir is not None:
        from mlpfuse.stages.damage import read_damage

        facts.damage = read_damage(damage_dir)
    kind, budget = target_params(spec.budget.target, facts)
    assert facts.shapes is not None
    dtype = None if spec.export.dtype == "auto" else getattr(torch, spec.export.dtype)
    multiple = facts.shapes.multiples(spec.export.moe_size_multiple, dtype)
    width = spec.export.multiple_of or (64 if spec.budget.export == "stock" else 1)
    cands, skipped = plan_candidates(spec.budget, facts, multiple, width)
    return facts, kind, budget, multiple, cands, skipped


def _handover_files(spec: PipelineSpec, session: Session, winner: Candidate, extra: dict[str, Any],
                    model_dir: Path) -> dict[str, str]:
    """What the handed-over checkpoint (``model_dir``) carries beside its weights: the spec that
    made it (``mlpfuse.yaml``) and its model card with the quality figures of this run."""
    import yaml

    from mlpfuse.orchestrator.report_html import sets_rows

    base = session.results["evaluate"]["result"]
    card = (model_dir / "README.md").read_text() if (model_dir / "README.md").exists() else ""
    w = winner.rounds[-1] if winner.rounds else {}
    lines = ["", "## Quality (held-out documents, never calibrated on)", "",
             "| model | perplexity | tokens |", "| --- | --- | --- |",
             f"| base | {base['perplexity']:.3f} | {base['tokens']} |",
             f"| compressed ({winner.name}) | {w.get('perplexity', float('nan')):.3f} | {w.get('tokens', 0)} |"]
    d = extra.get("distill") or {}
    if d.get("kept") and d.get("perplexity") is not None:
        lines.append(f"| compressed + distilled | {d['perplexity']:.3f} | {base['tokens']} |")
    base_sets = {n: {"perplexity": st["perplexity"]} for n, st in (base.get("sets") or {}).items()}
    rows = sets_rows({"base": {"sets": base_sets}, "winner": extra.get("winner"), "distill": d if d.get("kept") else {},
                      "data": {"sets": session.results["data"]["result"].get("sets")}})
    if rows and any(r["ratio"] is not None for r in rows):
        lines += ["", "Per held-out set (each set's perplexity ratio to the base on the same tokens, the KL from the "
                  "base model's next-token distribution and how often its most likely next token agrees):", "",
                  "| set | kind | base | compressed | ratio | KL | top-1 agreement |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['set']} | {r['role']} | {r['base']:.3f} | {r['winner']:.3f} | {r['ratio']:.3f}× | {r['kl']:.4f} | "
                  f"{r['top1']:.3f} |" for r in rows if r["ratio"] is not None]
    lines += ["", f"Parameters: {extra['winner']['params']:,} of the base model's "
                  f"{session.results['shard']['result']['params']:,}.",
              "", f"Why this candidate: {extra['winner']['reason']}", "",
              "Reproduce: `mlpfuse run mlpfuse.yaml` (the spec that made this checkpoint, beside it).", ""]
    return {"mlpfuse.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False),
            "README.md": card.rstrip() + "\n" + "\n".join(lines)}
