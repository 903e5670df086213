"""The Python API runs the CLI's pipeline: ``mlpfuse.compress`` on a spec gives the report
``mlpfuse run`` gives, keyword arguments build the same spec as the YAML, ``mlpfuse.plan`` lists
stages and candidates without running anything, and bad arguments raise the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import mlpfuse
from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.cli import main
from mlpfuse.orchestrator.pipeline import build_plan


def _doc(model: Path, tmp: Path) -> dict:
    return {
        "name": "api", "model": str(model), "cache": str(tmp / "cache"),
        "data": {"corpus": "shakespeare", "block_size": 64, "calib_tokens": 512, "eval_tokens": 256},
        "evaluate": {"window": 64, "stride": 64},
        "budget": {"target": {"params": 0.9}, "methods": ["prune", "layer_drop"], "halving": {"min_tokens": 64},
                   "refit": None},
    }


def _comparable(report: dict) -> dict:
    """A report without what differs between two runs of the same spec (timings, paths, hits)."""
    return {
        "base": {k: report["base"][k] for k in ("perplexity", "eval_tokens", "params", "ff_params")},
        "winner": {k: report["winner"][k] for k in ("name", "perplexity", "params", "reason")},
        "candidates": [{k: c[k] for k in ("name", "family", "settings", "params", "perplexity", "cache_key")}
                       for c in report["candidates"]],
        "skipped": report["skipped"],
        "keys": {n: s["cache_key"] for n, s in report["stages"].items()},
    }


def test_compress_gives_the_report_of_mlpfuse_run(tiny_lm: Path, tmp_path: Path, ray_local) -> None:
    doc = _doc(tiny_lm, tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    assert main(["run", str(spec), "--output", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert (tmp_path / "cli" / "run.log").read_text().count("finished in") >= len(cli["candidates"])

    # The same pipeline from keyword arguments, as a notebook would call it.
    result = mlpfuse.compress(model=str(tiny_lm), data=doc["data"], target=0.9, methods=["prune", "layer_drop"],
                              output=tmp_path / "api", cache=tmp_path / "cache", name="api",
                              evaluate=doc["evaluate"], budget={"halving": {"min_tokens": 64}, "refit": None})
    assert _comparable(result.report) == _comparable(cli)
    assert result.winner == cli["winner"]["name"] and result.perplexity == cli["winner"]["perplexity"]
    assert result.base_perplexity == cli["base"]["perplexity"] and result.params <= 0.9 * result.base_params
    assert result.export_path == tmp_path / "api" / "export" and (result.export_path / "config.json").exists()
    assert result.report_path == tmp_path / "api" / "report.json"

    # mlpfuse.plan: everything is cached now, and the candidates are the report's.
    plan = mlpfuse.plan(spec)
    assert plan.stages and all(s.cached for s in plan.stages)
    assert {c["name"] for c in plan.candidates} == {c["name"] for c in cli["candidates"]}
    assert plan.target is not None and plan.target["count"] == cli["budget"]["budget"]


def test_keyword_arguments_build_the_yaml_spec(tiny_lm: Path, tmp_path: Path) -> None:
    doc = _doc(tiny_lm, tmp_path)
    from mlpfuse.api import build_spec

    from_yaml = build_spec(doc)
    from_kwargs = build_spec(model=str(tiny_lm), data=doc["data"], target=0.9, methods=["prune", "layer_drop"],
                             cache=tmp_path / "cache", name="api", evaluate=doc["evaluate"],
                             budget={"halving": {"min_tokens": 64}, "refit": None})
    assert [n.key for n in build_plan(from_kwargs)] == [n.key for n in build_plan(from_yaml)]
    assert from_kwargs.budget == from_yaml.budget


def test_bad_arguments_raise_the_clis_error(tiny_lm: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="budget.target.params"):
        mlpfuse.compress(model=str(tiny_lm), target=-0.5, cache=tmp_path / "c")
    with pytest.raises(InputError, match="evaluate.stride=64 exceeds evaluate.window=32"):
        mlpfuse.plan(model=str(tiny_lm), evaluate={"window": 32, "stride": 64}, cache=tmp_path / "c")
    with pytest.raises(InputError, match="unknown key 'budgte'"):
        mlpfuse.plan(model=str(tiny_lm), budgte={}, cache=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing ran, nothing was cached
