"""report.json: what ran, what it cost, and what came out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlpfuse.core.artifacts import write_json_atomic
from mlpfuse.orchestrator.spec import PipelineSpec


def build_report(spec: PipelineSpec, results: dict[str, dict], seconds: float, store_root: Path) -> dict[str, Any]:
    shard = results["shard"]["result"]
    base = results["evaluate"]["result"]
    report: dict[str, Any] = {
        "model": spec.model,
        "name": spec.name,
        "seconds": round(seconds, 3),
        "stages": {
            name: {"stage": r["stage"], "cache_key": r["key"], "status": r["status"],
                   "seconds": round(r["seconds"], 3), "path": r["path"]}
            for name, r in results.items()
        },
        "base": {"params": shard["params"], "ff_params": shard["ff_params"], "perplexity": base["perplexity"],
                 "eval_tokens": base["tokens"]},
        "outputs": {"report": str(spec.output_dir() / "report.json"), "cache": str(store_root)},
    }
    if "data" in results:  # calibration and held-out sizes, and how the corpus was split
        report["data"] = {"corpus": spec.data.corpus, **results["data"]["result"]}
    sim = Path(results["similarity"]["path"]) / "similarity.json" if "similarity" in results else None
    if sim is not None and sim.exists():
        report["similarity"] = json.loads(sim.read_text())  # {"matrix": [L, L], "layers", ...}
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    write_json_atomic(path, report)
    return path
