"""Quality tables on real weights: every method against the baselines at the same size.

Each suite is a set of mlpfuse budget runs (the product's own path: Ray stages, the shared cache,
candidate evaluation on held-out text) with hand-given candidates, every candidate scored on the
full held-out budget (successive halving off, so each row is comparable), no training. The data
settings are the demo's (SmolLM2-135M, Shakespeare: 10,240 calibration tokens, block 256), so
shard, data and collect come from its cache; perplexity is scored on the first 2,048 held-out
tokens in windows of 256 with stride 128.

Suites:

- ``moefy``: MLPMoE at 10/20/30 % of MLP parameters removed: Compensated Pruning vs the same
  branch removal without compensation vs Fractal Fade vs magnitude and activation-aware neuron
  pruning, with contiguous, data-free-importance and activation-energy branches (10 branches, so
  whole branches hit the fractions exactly).
- ``fusion``: MLP Fusion 1536 -> 384 in layers 8-29 (and 1536 -> 768) against plain clustering,
  data-aware fusion and magnitude / random / activation-aware pruning at equal parameters, each
  with and without the least-squares refit; per-layer reconstruction and NTK errors when the
  ``layer_errors`` stage is present.
- ``merge``: FF merging of 1/3 and 1/2 of the FF sublayers (tied windows): every window of the
  size, permute and vanilla, then the best window's permute and vanilla merges against FF-sublayer
  drop and whole-layer drop at the same FF reduction.
- ``prefix``: the merge window search with and without prefix sharing (every evaluation
  recomputed): layer-forwards and seconds of the candidate evaluation.
- ``budget``: the planner at 90/80/70 % of parameters, successive halving vs every candidate on the
  full budget: the same winner? how many layer-forwards (tokens x layers) each took?
- ``distill``: the planner's winner at each target, then layer-wise distillation against the
  original (ZeRO-2, only the compressed FF sublayers train) for at most ``--minutes``: perplexity
  before and after, steps, tokens, minutes.

Usage (one suite at a time; each prints its table and writes ``runs/quality/<suite>.json``)::

    .venv/bin/python benchmarks/quality.py moefy
    .venv/bin/python benchmarks/quality.py budget --targets 0.9 0.8 0.7
    .venv/bin/python benchmarks/quality.py distill --targets 0.7 --minutes 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlpfuse.orchestrator.job import run_job  # noqa: E402
from mlpfuse.orchestrator.spec import parse_spec  # noqa: E402
from mlpfuse.orchestrator.store import ArtifactStore  # noqa: E402

FULL = 10**9  # halving.min_tokens above the held-out budget: every candidate on every token
BASE_SPEC: dict[str, Any] = {
    "model": "smollm2-135m",
    "data": {"corpus": "shakespeare", "block_size": 256, "calib_tokens": 10240, "eval_tokens": 4096},
    # The first 2,048 held-out tokens: half the demo's, to keep a suite within the hour on 2 cores.
    "evaluate": {"window": 256, "stride": 128, "batch_size": 8, "max_tokens": 2048},
}
MID = list(range(8, 30))


def run(name: str, budget: dict[str, Any], cache: str, out: Path, max_tokens: int | None = None,
        force: set[str] | None = None, distill: dict[str, Any] | None = None) -> dict[str, Any]:
    base = dict(BASE_SPEC)
    if max_tokens is not None:  # 0: every held-out token
        base["evaluate"] = {**base["evaluate"], "max_tokens": max_tokens}
    if distill is not None:
        base["distill"] = distill
    spec = parse_spec({**base, "name": name, "cache": cache, "output": str(out / name), "budget": budget})
    t0 = time.time()
    report, _ = run_job(spec, ArtifactStore(spec.cache), force)
    report["wall_seconds"] = round(time.time() - t0, 1)
    return report


def cand(method: dict[str, Any], refit: bool = False, drop: list[int] | None = None) -> dict[str, Any]:
    return {"candidate": method, "refit": {} if refit else None, "drop": drop or []}


def describe(c: dict[str, Any]) -> str:
    """A candidate's settings in a few words (hand-given candidates are named custom-N)."""
    if not c["name"].startswith("custom-"):
        return c["name"]
    s = c["settings"]
    m = dict(s["candidate"])
    parts = [m.pop("method")]
    relevant = {"prune": ("criterion", "allocation", "ratio"), "fusion": ("mode", "weighting", "ratio"),
                "merge": ("start", "size", "permute"),
                "moefy": ("op", "assignment") + {"compensated": ("compensate", "keep_branches"),
                                                 "fade": ("sparsity",)}.get(m.get("op", ""), ())}
    for k in relevant.get(parts[0], ()):
        if k in m:
            parts.append(f"{k}={m[k]}")
    if m.get("layers") and parts[0] != "merge":
        ls = m["layers"]
        parts.append(f"layers={ls[0]}-{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else f"layers={ls}")
    if s.get("drop"):
        parts.append(f"drop={s['drop']}")
    return " ".join(parts) + (" +refit" if s.get("refit") else "")


def table(report: dict[str, Any], title: str) -> list[dict[str, Any]]:
    base = report["base"]["perplexity"]
    rows = []
    print(f"\n## {title}  (base perplexity {base:.3f}, {report['base']['params']:,} params, "
          f"{report['base']['eval_tokens']} held-out tokens)")
    print(f"{'candidate':<58} {'params':>12} {'FF params':>12} {'ppl':>10} {'x base':>8}")
    for c in sorted(report["candidates"], key=lambda c: c["perplexity"] if c["perplexity"] is not None else 1e30):
        ppl = c["perplexity"]
        label = describe(c)
        print(f"{label:<58} {c['params']:>12,} {c['ff_params']:>12,} "
              f"{ppl if ppl is not None else float('nan'):>10.3f} {(ppl or float('nan')) / base:>8.2f}")
        rows.append({"candidate": label, "name": c["name"], "params": c["params"], "ff_params": c["ff_params"],
                     "perplexity": ppl, "ratio": None if ppl is None else ppl / base,
                     "tokens": c["rounds"][-1]["tokens"] if c["rounds"] else None})
    for s in report.get("skipped", []):
        print(f"  skipped {s['method']}: {s['why']}")
    return rows


def suite_moefy(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for removed in args.removed:
        keep = round(1 - removed, 6)
        cands = []
        for assign in args.assignments:
            moe = {"method": "moefy", "branches": 10, "assignment": assign}
            cands += [cand({**moe, "op": "compensated", "keep_branches": keep}),
                      cand({**moe, "op": "compensated", "keep_branches": keep, "compensate": False}),
                      cand({**moe, "op": "fade", "sparsity": removed})]
        if args.baselines:
            cands += [cand({"method": "prune", "criterion": c, "ratio": keep}) for c in ("magnitude", "activation")]
        rep = run(f"quality-moefy-{int(removed * 100)}", {
            "target": {"ff_params": keep + 1e-3}, "methods": [], "candidates": cands,
            "halving": {"min_tokens": FULL}, "export": "tied"}, args.cache, args.out, args.max_tokens)
        out[f"-{int(removed * 100)}% FF"] = table(rep, f"MLPMoE: {int(removed * 100)}% of MLP parameters removed")
    return out


def suite_fusion(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for ratio in args.ratios:
        cands = []
        for refit in (False, True):
            fuse = {"method": "fusion", "ratio": ratio, "layers": MID, "iters": args.iters}
            cands += [cand(fuse, refit), cand({**fuse, "mode": "cluster"}, refit),
                      cand({**fuse, "weighting": "energy"}, refit)]
            cands += [cand({"method": "prune", "criterion": c, "ratio": ratio, "layers": MID}, refit)
                      for c in ("magnitude", "random", "activation")]
        rep = run(f"quality-fusion-{ratio}", {
            # Layers 8-29 fused to `ratio` of their width, the other 8 layers whole.
            "target": {"ff_params": (30 - len(MID) + len(MID) * ratio) / 30 + 1e-3}, "methods": [],
            "candidates": cands, "refit": None, "halving": {"min_tokens": FULL}, "export": "tied"},
            args.cache, args.out, args.max_tokens)
        rows = table(rep, f"MLP Fusion 1536 -> {int(1536 * ratio)} in layers 8-29")
        errs = rep.get("layer_errors")
        if errs:
            for r in rows:
                for kind, key in (("recon", "layer_errors"), ("ntk", "ntk_errors")):
                    vals = [v for v in (rep.get(key) or {}).get(r["name"], []) if v is not None]
                    r[f"mean_{kind}"] = sum(vals) / len(vals) if vals else None
        out[f"1536->{int(1536 * ratio)}"] = rows
    return out


def suite_merge(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for frac in args.fractions:
        num, den = (int(x) for x in frac.split("/"))
        target = {"ff_params": 1 - num / den + 1e-3}
        label = f"{frac} of FF sublayers"
        rep = run(f"quality-merge-search-{num}-{den}", {
            "target": target, "methods": ["merge"], "refit": None, "export": "tied"}, args.cache, args.out,
            args.max_tokens)
        search = table(rep, f"FF merging window search, {label} (successive halving over every window)")
        best = min((c for c in rep["candidates"] if c["method"] == "merge" and c["settings"]["candidate"]["permute"]
                    and c["perplexity"] is not None), key=lambda c: (-len(c["rounds"]), c["perplexity"]))
        m = best["settings"]["candidate"]
        window = list(range(m["start"], m["start"] + m["size"]))
        cands = [cand({"method": "merge", "start": m["start"], "size": m["size"], "permute": p}) for p in (True, False)]
        cands += [cand({"method": "ff_drop", "layers": window[1:]}), cand({"method": "layer_drop", "layers": window[1:]})]
        rep2 = run(f"quality-merge-{num}-{den}", {
            "target": target, "methods": ["ff_drop", "layer_drop"], "refit": None, "candidates": cands,
            "halving": {"min_tokens": FULL}, "export": "tied"}, args.cache, args.out, args.max_tokens)
        out[label] = {"search": search, "compare": table(rep2, f"FF merging {label}: best window {window[0]}-"
                                                               f"{window[-1]} and baselines, full held-out budget")}
    return out


def suite_prefix(args: argparse.Namespace) -> dict[str, Any]:
    """The merge window search (every window, permute and vanilla, successive halving) scored
    with and without prefix sharing, every evaluation recomputed: layer-forwards and seconds."""
    out = {}
    for frac in args.fractions:
        num, den = (int(x) for x in frac.split("/"))
        for share in (True, False):
            rep = run(f"quality-prefix-{num}-{den}-{share}", {
                "target": {"ff_params": 1 - num / den + 1e-3}, "methods": ["merge"], "refit": None, "export": "tied",
                "share_prefix": share, "layer_errors": False}, args.cache, args.out, args.max_tokens,
                force={"evaluate", "prefix"})
            b = rep["budget"]
            out[f"{frac} share_prefix={share}"] = {
                "seconds": b["seconds"], "layer_tokens": b["layer_tokens"], "evaluations": b["evaluations"],
                "winner": rep["winner"]["name"], "winner_perplexity": rep["winner"]["perplexity"]}
        on, off = out[f"{frac} share_prefix=True"], out[f"{frac} share_prefix=False"]
        on["layer_forward_ratio"] = off["layer_tokens"] / on["layer_tokens"]
        on["seconds_ratio"] = off["seconds"] / on["seconds"]
        print(f"\n## prefix sharing, merge search {frac}: layer-forwards {off['layer_tokens']:,} -> {on['layer_tokens']:,} "
              f"({on['layer_forward_ratio']:.2f}x fewer), seconds {off['seconds']:.1f} -> {on['seconds']:.1f} "
              f"({on['seconds_ratio']:.2f}x), winners {off['winner']} / {on['winner']}")
    return out


def suite_budget(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    methods = args.methods
    for t in args.targets:
        budget = {"target": {"params": t}, "methods": methods,
                  "halving": {"min_tokens": args.min_tokens, "factor": args.factor}}
        halving = run(f"quality-budget-{t}-halving-f{args.factor}", budget, args.cache, args.out)
        full = run(f"quality-budget-{t}-full", {**budget, "halving": {"min_tokens": FULL}}, args.cache, args.out)
        assert halving["base"]["perplexity"] == full["base"]["perplexity"]
        rows = table(full, f"Budget: {int(round((1 - t) * 100))}% of parameters removed, every candidate on every token")
        hb, fb = halving["budget"], full["budget"]
        summary = {
            "halving_winner": halving["winner"]["name"], "full_winner": full["winner"]["name"],
            "same_winner": halving["winner"]["name"] == full["winner"]["name"],
            "layer_tokens_halving": hb["layer_tokens"], "layer_tokens_full": fb["layer_tokens"],
            "layer_tokens_full_without_prefix": fb["layer_tokens_without_prefix"],
            "ratio_full_over_halving": fb["layer_tokens"] / max(hb["layer_tokens"], 1),
            "eval_seconds_halving": hb["seconds"], "eval_seconds_full": fb["seconds"],
            "base_perplexity": full["base"]["perplexity"], "winner_perplexity": full["winner"]["perplexity"],
            "best_single": min(r["perplexity"] for r in rows if r["perplexity"] is not None),
        }
        print(json.dumps(summary, indent=1))
        out[f"params {t}"] = {"candidates": rows, "halving": summary}
    return out


def suite_distill(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's winner at each target, then layer-wise distillation (DeepSpeed ZeRO-2, one
    process, only the compressed FF sublayers train) for at most ``--minutes``."""
    out = {}
    for t in args.targets:
        budget = {"target": {"params": t}, "methods": args.methods,
                  "halving": {"min_tokens": args.min_tokens, "factor": args.factor}}
        distill = {"train": {"steps": 100_000, "lr": args.lr, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1,
                             "checkpoint_every": 20, "seed": 0, "layer_loss": args.layer_loss},
                   "max_blocks": 40, "minutes": args.minutes}
        rep = run(f"quality-distill-{t}-{args.minutes}min-{args.layer_loss}-lr{args.lr:g}", budget, args.cache, args.out,
                  distill=distill)
        base, d = rep["base"]["perplexity"], rep["distill"]
        row = {"removed": round(1 - t, 6), "winner": rep["winner"]["name"], "params": rep["winner"]["params"],
               "base": base, "before": d["perplexity_before"], "after": d["perplexity"],
               "before_x": d["perplexity_before"] / base, "after_x": d["perplexity"] / base,
               "steps": d["steps"], "tokens": d["tokens"], "minutes": round(d["seconds"] / 60, 1),
               "kept": d["kept"], "trainable": d["trainable"], "train_layers": d["train_layers"],
               "loss_first": d["losses"][0], "loss_last": d["losses"][-1]}
        print(f"\n## Distilled winner at -{row['removed']:.0%} params: {row['winner']} "
              f"base {base:.3f} | before {row['before']:.3f} ({row['before_x']:.2f}x) | "
              f"after {row['after']:.3f} ({row['after_x']:.2f}x) | {row['steps']} steps, {row['tokens']:,} tokens, "
              f"{row['minutes']} min, layer loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}")
        out[f"params {t}"] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["moefy", "fusion", "merge", "budget", "prefix", "distill"])
    ap.add_argument("--cache", default="~/.cache/mlpfuse")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--assignments", nargs="+", default=["contiguous", "importance", "activation"])
    ap.add_argument("--no-baselines", dest="baselines", action="store_false", help="moefy: without the pruning rows")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--fractions", nargs="+", default=["1/3", "1/2"])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    ap.add_argument("--methods", nargs="+", default=["prune", "moefy", "layer_drop", "combo"])
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="moefy/fusion/merge: score this many held-out tokens (0: all; default 2,048)")
    ap.add_argument("--min-tokens", type=int, default=128, help="budget suite: first halving round's tokens")
    ap.add_argument("--factor", type=int, default=2, help="budget/distill: halving keeps 1/factor each round")
    ap.add_argument("--minutes", type=float, default=30, help="distill suite: training wall-clock cap")
    ap.add_argument("--lr", type=float, default=3e-4, help="distill suite: learning rate")
    ap.add_argument("--layer-loss", choices=["mse", "relative"], default="mse", help="distill suite: layer loss")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suites = {"moefy": suite_moefy, "fusion": suite_fusion, "merge": suite_merge, "budget": suite_budget,
              "prefix": suite_prefix, "distill": suite_distill}
    result = suites[args.suite](args)
    path = args.out / f"{args.suite}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
