"""Per-layer reconstruction and NTK errors of built candidates, as Ray tasks of one session."""

from __future__ import annotations

from typing import Any

from mlpfuse.orchestrator.pipeline import Session, make_node
from mlpfuse.stages.layer_errors import LayerErrorsConfig, ProbeConfig


def score_layers(session: Session, spec: Any, candidates: list, *, probe: ProbeConfig | None = None,
                 config: LayerErrorsConfig | None = None) -> dict[str, dict[str, list[float | None]]]:
    """One ``probe`` node (the original model's FF inputs on held-out tokens) and one
    ``layer_errors.<name>`` node per candidate (its overlay is the node ``compress.<name>``,
    already run in ``session``), all in one ``session.run`` (concurrent Ray tasks).

    ``candidates``: names, or objects with a ``name`` (``budget.Candidate``). Returns
    ``{"recon": {name: [per layer]}, "ntk": {...}, "ntk_sign": {...}}``, None where a layer is
    unchanged. ``spec`` is accepted for symmetry with the other job steps (unused).
    """
    names = [c if isinstance(c, str) else c.name for c in candidates]
    known = dict(session.keys)
    probe_node = make_node(known, "probe", "probe", probe or ProbeConfig(), {"shard": "shard", "data": "data"})
    known["probe"] = probe_node.key
    cfg = config or LayerErrorsConfig()
    nodes = [make_node(known, f"layer_errors.{n}", "layer_errors", cfg,
                       {"shard": "shard", "probe": "probe", "overlay": f"compress.{n}"}) for n in names]
    res = session.run([probe_node, *nodes])
    out: dict[str, dict[str, list[float | None]]] = {"recon": {}, "ntk": {}, "ntk_sign": {}}
    for n in names:
        r = res[f"layer_errors.{n}"]["result"]
        for k in out:
            out[k][n] = r[k]
    return out
