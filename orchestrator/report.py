"""report.json: what ran, what it cost, and what came out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlpfuse.core.artifacts import write_json_atomic
from mlpfuse.orchestrator.spec import PipelineSpec

if TYPE_CHECKING:
    from mlpfuse.orchestrator.pipeline import Session


def build_report(spec: PipelineSpec, session: Session, seconds: float) -> dict[str, Any]:
    """Each stage with its key, status, time and artifact location (and, where it ran, the node
    and device), the base model's size and perplexity, the data split and the similarity map."""
    results, store = session.results, session.store
    shard = results["shard"]["result"]
    base = results["evaluate"]["result"]
    report: dict[str, Any] = {
        "model": spec.model,
        "name": spec.name,
        "seconds": round(seconds, 3),
        "stages": {
            name: {"stage": r["stage"], "cache_key": r["key"], "status": r["status"],
                   "seconds": round(r["seconds"], 3), "path": store.location(r["stage"], r["key"]),
                   **{k: r[k] for k in ("node", "device") if k in r}}
            for name, r in results.items()
        },
        "base": {"params": shard["params"], "ff_params": shard["ff_params"], "perplexity": base["perplexity"],
                 "eval_tokens": base["tokens"],
                 "sets": {n: {"perplexity": st["perplexity"], "tokens": st["tokens"]}
                          for n, st in (base.get("sets") or {}).items()}},
        "outputs": {"report": str(spec.output_dir() / "report.json"), "cache": str(store.root)},
    }
    if "data" in results:  # calibration and held-out sizes, and how the corpus was split
        report["data"] = {"corpus": spec.data.corpus, **results["data"]["result"]}
    sim = session.path("similarity") / "similarity.json" if "similarity" in results else None
    if sim is not None and sim.exists():
        report["similarity"] = json.loads(sim.read_text())  # {"matrix": [L, L], "layers", ...}
    return report


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    write_json_atomic(path, report)
    return path
