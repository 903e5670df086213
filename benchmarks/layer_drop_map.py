"""ReplaceMe's fitted linear map against plain layer drop, the same layers, on real SmolLM2-135M.

For each number of dropped layers n, the run of n contiguous layers with the highest mean
cos(layer input, layer output) on calibration tokens (never the first or last layer) is
dropped plainly and with ``linear_map: true`` (``map_loss`` relative, the default, and mse, as
published); the planner's candidates (the n individually quietest layers, not contiguous, dropped
plainly and with a map for each of their runs) are scored beside them. Every model is scored on the demo's data
(calibration: Shakespeare + Python source; held-out sets: both, and unseen Python reference prose),
each set's perplexity ratio to the base model on the same windows. Stages are the product's own,
called directly; shard, data and collect are built once under ``--work``.

    .venv/bin/python benchmarks/layer_drop_map.py --layers 4 8     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quietest_run(facts: Any, size: int) -> list[int] | None:
    """The ``size`` contiguous layers (never the first or the last) with the highest mean
    cos(layer input, layer output) on calibration tokens, or None when no such run exists."""
    starts = range(1, facts.num_layers - size)
    if size < 1 or not starts:
        return None
    best = max(starts, key=lambda a: (sum(facts.cos[a : a + size]), -a))
    return list(range(best, best + size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "layer_drop_map")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6])
    args = ap.parse_args()

    import numpy as np
    import yaml

    from mlpfuse.orchestrator.budget import ModelFacts
    from mlpfuse.orchestrator.spec import parse_spec
    from mlpfuse.stages import collect, compress, data, evaluate, shard
    from mlpfuse.stages.compress import CompressConfig
    from mlpfuse.stages.model.checkpoint import resolve_source, source_key

    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "smollm2-demo.yaml").read_text()))
    w = args.work
    sh, dd, co = w / "shard", w / "data", w / "collect"
    if not (sh / "shard.json").exists():
        shard.run(spec.shard_config(source_key(resolve_source(spec.model))), {}, sh)
    if not (dd / "eval.parquet").exists():
        data.run(spec.data_config(), {"shard": sh}, dd)
    if not (co / "m" / "stats").exists():
        cfg = collect.CollectConfig(features=(), inputs=False)
        collect.run_part(collect.CollectPartConfig(**cfg.model_dump(), worker=0), {"shard": sh, "data": dd}, co / "p0")
        collect.run_merge(cfg, {"shard": sh, "part0": co / "p0"}, co / "m")
    facts = ModelFacts.read(sh, co / "m")
    ev = spec.evaluate
    base_dir = w / "eval-base"
    if not (base_dir / "metrics.json").exists():
        evaluate.run(ev, {"shard": sh, "data": dd}, base_dir)
    rows = []
    for n in args.layers:
        run = quietest_run(facts, n)
        assert run is not None
        quiet = sorted([i for i in np.argsort(facts.cos)[::-1].tolist() if 0 < i < facts.num_layers - 1][:n])
        span = f"run {run[0]}-{run[-1]}"
        for tag, name, cand in (
                ("run-plain", f"{span} plain", {"method": "layer_drop", "layers": run}),
                ("run-map", f"{span} + map (relative)", {"method": "layer_drop", "layers": run, "linear_map": True}),
                ("run-map-mse", f"{span} + map (mse)", {"method": "layer_drop", "layers": run, "linear_map": True,
                                                         "map_loss": "mse"}),
                ("quiet-plain", f"quietest {quiet} plain", {"method": "layer_drop", "layers": quiet}),
                ("quiet-map", f"quietest {quiet} + map (relative)", {"method": "layer_drop", "layers": quiet,
                                                                      "linear_map": True})):
            tag = f"n{n}-{tag}"
            out = w / f"compress-{tag}"
            if not (out / "overlay.json").exists():
                compress.run(CompressConfig.model_validate({"candidate": cand}), {"shard": sh, "data": dd}, out)
            res = evaluate.run(ev, {"shard": sh, "data": dd, "overlay": out, "reference": base_dir}, w / f"eval-{tag}")
            sets = {k: {"ratio": float(np.exp((s["nll_sum"] - s["base_nll_sum"]) / s["tokens"])),
                        "kl": s["kl_sum"] / s["tokens"], "top1": s["top1_sum"] / s["tokens"]} for k, s in res["sets"].items()}
            rows.append({"n": n, "name": name, "sets": sets})
            print(f"n={n} {name}: " + ", ".join(f"{k} {v['ratio']:.3f}× (KL {v['kl']:.3f}, top-1 {v['top1']:.3f})"
                                                for k, v in sets.items()), flush=True)
    (w / "layer_drop_map.json").write_text(json.dumps(rows, indent=1))
    names = list(rows[0]["sets"])
    print("\n| layers dropped | which | " + " | ".join(f"{k} ratio" for k in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for r in rows:
        print(f"| {r['n']} | {r['name']} | " + " | ".join(f"{r['sets'][k]['ratio']:.3f}×" for k in names) + " |")


if __name__ == "__main__":
    main()
