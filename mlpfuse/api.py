"""The Python API: the same pipeline as ``mlpfuse run``, called from a script or a notebook.

    import mlpfuse

    result = mlpfuse.compress(model="smollm2-135m", data="shakespeare", target=0.8,
                              methods=["prune", "fusion"], output="runs/small")
    print(result.winner, result.reason, result.perplexity, result.export_path)

``compress`` builds a pipeline spec from its arguments (or takes one: a YAML path, a mapping or a
``PipelineSpec``), validates it exactly as the CLI does (a bad value raises ``InputError`` naming
it), runs it on embedded Ray or the cluster at ``address``, and returns a :class:`CompressResult`
around the report ``mlpfuse run`` writes. ``plan`` returns the stages and the budget's candidates
with their cache keys, running nothing and downloading no weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlpfuse.orchestrator.spec import PipelineSpec


@dataclass(frozen=True)
class CompressResult:
    """What a run handed over: the winner, why it won, its perplexity against the base model's,
    where the export is, and the whole report (``report.json``)."""

    winner: str | None
    reason: str | None
    perplexity: float | None
    base_perplexity: float
    params: int | None
    base_params: int
    export_path: Path | None
    report_path: Path
    report: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PlannedStage:
    name: str
    stage: str
    key: str
    cached: bool
    inputs: dict[str, str]


@dataclass(frozen=True)
class Plan:
    """The base stages (each with its cache key and whether it is cached) and, with a budget, the
    candidates the planner would build (name, method family, compress settings)."""

    stages: list[PlannedStage]
    candidates: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    target: dict[str, Any] | None
    # Each stage's disk, tokens and FLOPs, from the checkpoint's metadata (mlpfuse.orchestrator.estimate).
    estimates: list[Any] = field(default_factory=list)
    shape: Any = None


def build_spec(spec: str | Path | Mapping[str, Any] | PipelineSpec | None = None, *,
               model: str | None = None, data: str | Mapping[str, Any] | None = None,
               target: float | int | Mapping[str, Any] | None = None, methods: Sequence[str] | None = None,
               output: str | Path | None = None, cache: str | Path | None = None,
               address: str | None = None, name: str | None = None,
               **sections: Any) -> PipelineSpec:
    """A validated :class:`PipelineSpec` from a spec (YAML path, mapping or spec) and/or keyword
    arguments: ``target`` is a fraction of the parameters kept (0.8) or an absolute count, or a
    mapping as in the spec's ``budget.target``; ``methods`` the budget's method families;
    ``sections`` any other top-level spec section (``export=``, ``distill=``, ``evaluate=``...)."""
    from mlpfuse.orchestrator.spec import PipelineSpec, load_spec, parse_spec

    if isinstance(spec, PipelineSpec):
        doc: dict[str, Any] = spec.model_dump(mode="json", exclude_unset=True)
    elif isinstance(spec, (str, Path)):
        doc = load_spec(spec).model_dump(mode="json", exclude_unset=True)
    else:
        doc = dict(spec or {})
    if model is not None:
        doc["model"] = model
    if data is not None:
        doc["data"] = data
    if name is not None:
        doc["name"] = name
    if output is not None:
        doc["output"] = str(output)
    if cache is not None:
        doc["cache"] = str(cache)
    if address is not None:
        doc["ray"] = {**doc.get("ray", {}), "address": address}
    for section, value in sections.items():  # merged into the spec's section of that name
        doc[section] = {**doc[section], **value} if isinstance(doc.get(section), dict) and isinstance(value, Mapping) \
            else value
    if target is not None or methods is not None:
        budget = dict(doc.get("budget") or {})
        if target is not None:
            budget["target"] = dict(target) if isinstance(target, Mapping) else {"params": target}
        if methods is not None:
            budget["methods"] = list(methods)
        doc["budget"] = budget
    return parse_spec(doc, "(mlpfuse.compress arguments)")


def compress(spec: str | Path | Mapping[str, Any] | PipelineSpec | None = None, *,
             model: str | None = None, data: str | Mapping[str, Any] | None = None,
             target: float | int | Mapping[str, Any] | None = None, methods: Sequence[str] | None = None,
             output: str | Path | None = None, cache: str | Path | None = None,
             address: str | None = None, force: Sequence[str] = (), **sections: Any) -> CompressResult:
    """Run the pipeline (as ``mlpfuse run``): cached stages are reused, a killed run resumes."""
    from mlpfuse.orchestrator.job import run_job
    from mlpfuse.orchestrator.store import ArtifactStore

    pipeline = build_spec(spec, model=model, data=data, target=target, methods=methods, output=output,
                          cache=cache, address=address, **sections)
    report, path = run_job(pipeline, ArtifactStore(pipeline.cache), set(force))
    w = report.get("winner")
    return CompressResult(
        winner=w["name"] if w else None, reason=w["reason"] if w else None,
        perplexity=w["perplexity"] if w else None, base_perplexity=report["base"]["perplexity"],
        params=w["params"] if w else None, base_params=report["base"]["params"],
        export_path=Path(report["export"]["path"]) if "export" in report else None,
        report_path=path, report=report,
    )


def plan(spec: str | Path | Mapping[str, Any] | PipelineSpec | None = None, **kwargs: Any) -> Plan:
    """The stages and candidates a run would have, with their keys; runs and downloads nothing."""
    from mlpfuse.orchestrator.estimate import ModelShape, estimate
    from mlpfuse.orchestrator.job import plan_budget
    from mlpfuse.orchestrator.pipeline import build_plan
    from mlpfuse.orchestrator.store import ArtifactStore
    from mlpfuse.stages.model.checkpoint import model_metadata

    pipeline = build_spec(spec, **kwargs)
    store = ArtifactStore(pipeline.cache)
    stages = [PlannedStage(n.name, n.stage, n.key, store.get(n.stage, n.key, verify=False) is not None,
                           dict(n.input_keys)) for n in build_plan(pipeline)]
    candidates, skipped, target = plan_budget(pipeline, store)
    shape = ModelShape.from_config(*model_metadata(pipeline.model))
    return Plan(stages, candidates, skipped, target, estimate(pipeline, shape), shape)
