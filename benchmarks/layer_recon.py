"""Per-layer reconstruction error of neuron selection and compensation on real SmolLM2-135M.

For every layer's FF block, at the widths the planner's uniform pruning keeps at −15 %, −20 % and
−30 % of the model's parameters, the relative output error ‖Ŷ − Y‖² / ‖Y‖² of:

- ``act``: activation-aware selection (E[h²]·‖W_down[:, j]‖²), no compensation;
- ``act+refit``: the same neurons, down projection re-solved by the ridge refit (λ = 1e-3, the
  product's default): the planner's winner today;
- ``obs``: structured OBS (``criterion: obs``, 64 batches, its own compensation);
- ``obs+refit``: OBS's neurons, down projection re-solved by the same ridge refit.

Every error is computed from HᵀH statistics of the block's own original inputs, on two token
sets: the calibration tokens the methods saw (``calib``) and held-out documents they never saw
(``heldout``: the data stage's evaluation split, tokenized the same way). Both come from the
product's ``collect`` stage. Everything runs on the original model's inputs (no sequential drift),
so the table isolates each block.

    .venv/bin/python benchmarks/layer_recon.py            # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m"


def _prepare(work: Path, tokens: int, heldout_tokens: int) -> dict[str, Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlpfuse.stages import collect, data, shard
    from mlpfuse.stages.data import corpus_key, read_eval
    from mlpfuse.stages.model.checkpoint import resolve_source, source_key

    sh, dd, hd = work / "shard", work / "data", work / "heldout"
    if not (sh / "shard.json").exists():
        shard.run(shard.ShardConfig(model=MODEL, source_key=source_key(resolve_source(MODEL))), {}, sh)
    if not (dd / "calib.parquet").exists():
        cfg = data.TokenizeConfig(corpus="shakespeare", corpus_key=corpus_key("shakespeare"), block_size=256,
                                  calib_tokens=tokens, eval_tokens=heldout_tokens)
        data.run(cfg, {"shard": sh}, dd)
    if not (hd / "calib.parquet").exists():  # the held-out documents, as calibration blocks of 256
        hd.mkdir(parents=True, exist_ok=True)
        ids = np.concatenate(read_eval(dd))
        ids = ids[: len(ids) // 256 * 256].astype(np.int32)
        pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), 256)}),
                       hd / "calib.parquet")
    out = {"shard": sh}
    for name, d in (("calib", dd), ("heldout", hd)):
        c = work / f"collect-{name}"
        if not (c / "m" / "collect.json").exists() and not (c / "m" / "stats").exists():
            cfg = collect.CollectConfig(features=("hidden",), inputs=False)
            collect.run_part(collect.CollectPartConfig(**cfg.model_dump(), worker=0), {"shard": sh, "data": d}, c / "p0")
            collect.run_merge(cfg, {"shard": sh, "part0": c / "p0"}, c / "m")
        out[name] = c / "m"
    return out


def _keep_ratio(shard_dir: Path, fraction: float) -> float:
    """The planner's uniform keep ratio for a parameter target (as ``plan_candidates`` computes it)."""
    p = json.loads((shard_dir / "shard.json").read_text())["params"]
    remove = p["total"] - int(fraction * p["total"])
    return math.floor((1 - remove / p["ff"]) * 4096) / 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "layer_recon")
    ap.add_argument("--tokens", type=int, default=10240)
    ap.add_argument("--heldout-tokens", type=int, default=8192)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.8, 0.7])
    args = ap.parse_args()

    import torch

    from mlpfuse.stages.math.pruning import activation_scores, gram_sse, kept_neurons, obs_prune
    from mlpfuse.stages.math.refit import RefitAccumulator
    from mlpfuse.stages.model.features import moments, read_stats
    from mlpfuse.stages.model.runner import LayerStreamedModel

    paths = _prepare(args.work, args.tokens, args.heldout_tokens)
    model = LayerStreamedModel(paths["shard"])
    fam, cfg = model.family, model.config
    rows = []
    for target in args.targets:
        ratio = _keep_ratio(paths["shard"], target)
        for i in range(model.num_layers):
            sd = model.layer_state(i)
            for ref in fam.ff_blocks(cfg, sd):
                ff = fam.read_ff(cfg, sd, ref).to(torch.float32)
                n = ff.intermediate_size
                k = int(math.floor(ratio * n + 1e-9))
                st = {s: read_stats(paths[s], i)[ref.name] for s in ("calib", "heldout")}
                g = {s: torch.from_numpy(st[s]["hidden.gram"]) for s in st}
                yty = {s: float((ff.down.double() @ g[s] * ff.down.double()).sum()) for s in st}

                def refit(kept: torch.Tensor) -> torch.Tensor:
                    acc = RefitAccumulator.from_gram(g["calib"], torch.from_numpy(st["calib"]["hidden.sum"]),
                                                     int(st["calib"]["count"][0]), kept, ff.down, None)
                    return acc.solve(1e-3)[0]

                t0 = time.perf_counter()
                act = kept_neurons(activation_scores(ff, torch.from_numpy(moments(st["calib"])[2]).float()), k)
                act_fit = refit(act)
                t_act = time.perf_counter() - t0
                t0 = time.perf_counter()
                obs, obs_down = obs_prune(ff.down, g["calib"], k)
                t_obs = time.perf_counter() - t0
                variants = {"act": (act, ff.down[:, act]), "act+refit": (act, act_fit), "obs": (obs, obs_down),
                            "obs+refit": (obs, refit(obs))}
                row = {"target": target, "layer": i, "block": ref.name, "k": k, "I": n,
                       "seconds": {"act+refit": t_act, "obs": t_obs}}
                for s in st:
                    row[s] = {v: gram_sse(ff.down, g[s], kept, d) / yty[s] for v, (kept, d) in variants.items()}
                rows.append(row)
                print(f"target {target} layer {i:2d} k={k}: " + "  ".join(
                    f"{s} " + " ".join(f"{v}={row[s][v]:.4f}" for v in variants) for s in st), flush=True)
    out = args.work / "layer_recon.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out}\n")
    for target in args.targets:
        sel = [r for r in rows if r["target"] == target]
        print(f"### −{round((1 - target) * 100)} % of parameters (keep {sel[0]['k']} of {sel[0]['I']} neurons per block)\n")
        print("| layer | calib act+refit | calib obs | calib obs+refit | held-out act+refit | held-out obs | held-out obs+refit |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in sel:
            print(f"| {r['layer']} | " + " | ".join(f"{r[s][v]:.4f}" for s in ("calib", "heldout")
                                                     for v in ("act+refit", "obs", "obs+refit")) + " |")
        for s in ("calib", "heldout"):
            worse = [r["layer"] for r in sel if r[s]["obs"] > r[s]["act+refit"]]
            mean = {v: sum(r[s][v] for r in sel) / len(sel) for v in ("act", "act+refit", "obs", "obs+refit")}
            print(f"\n{s}: mean " + ", ".join(f"{v} {m:.4f}" for v, m in mean.items())
                  + f"; layers where obs > act+refit: {worse or 'none'}")
        t = {v: sum(r['seconds'][v] for r in sel) for v in ("act+refit", "obs")}
        print(f"selection + fit seconds, all layers: act+refit {t['act+refit']:.1f}, obs {t['obs']:.1f}\n")


if __name__ == "__main__":
    main()
