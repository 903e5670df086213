"""Proof at scale: every stage of the pipeline on a generated >= 3 B dense and >= 2 B MoE
checkpoint, on a small machine, with each stage's time, peak memory and disk.

A random-weight checkpoint (bf16, sharded safetensors with ``model.safetensors.index.json``,
written tensor by tensor by ``benchmarks/generate.py``) is cached under ``--cache`` (default
/tmp/mlpfuse-scale/<arch>-<params>). Then every stage runs as its plain function
(``mlpfuse.stages.registry.STAGES[name].run(config, inputs, out_dir)``) in its own child process, so each
peak RSS is that stage's alone, wired the way ``orchestrator/pipeline.py`` and
``orchestrator/job.py`` wire them (same input roles), with artifacts under
``--cache``/work-<arch>/<node> (not the store under ~/.cache/mlpfuse):

  import              python + torch + transformers + every stage imported (the RSS floor)
  shard               the checkpoint -> one file per layer
  data                bundled ``shakespeare``, reduced: --calib-tokens 512, --eval-tokens 512,
                      --block-size 256
  collect.part0       collect_part (one worker), then ``collect`` (the merge)
  compress.<method>   prune-activation (ratio --ratio), prune-activation+refit (built from the
                      un-refit twin, as the job does), fusion (--fusion-iters Lloyd iterations on
                      the first --fusion-layers layers: greedy k-means++ seeding costs minutes per
                      layer at this width on 2 cores), moefy (compensated, importance, 8 branches),
                      merge (a window of 3 layers, permute; MoE: whole MoE blocks, experts matched)
                      and layer_drop (2 layers); MoE: every width method works per expert
  evaluate.base       perplexity of the base model (window = stride = block size)
  evaluate.<cand>     the same with the prune-activation+refit candidate as ``overlay``
  export.<cand>       a stock checkpoint of that candidate

Memory: the child's ``getrusage(RUSAGE_SELF).ru_maxrss`` and the parent's 50 ms psutil samples
(total, and anonymous = RSS minus file-backed/shared pages, as ``bench_backbone.py`` reports).
RSS/ckpt divides by the checkpoint's safetensors bytes; the target is <= 0.25.
Disk: bytes newly allocated under the stage's out dir (files whose inode no earlier stage
holds: collect hard-links its worker's Parquet files, so its merge costs little), and the work
dir's peak and the checkpoint cache. Overlays not needed later are deleted right after they are
measured, and the work dir at the end, unless ``--keep``.

``--gram-max`` (default 0) is passed to collect: with the stage's default (8192) every dense
layer of the 3 B model (FF 8192) would store HᵀH as an 8192² float64 matrix (0.54 GB/layer,
26 GB for 49 layers, written twice: the part and the merge), which this disk cannot hold; the
pruned refit then accumulates its statistics from the tokens, as it does wherever no gram exists.

A stage that fails or runs past ``--stage-timeout`` is reported with the tail of its log (in
<cache>/logs-<arch>-<params>/); stages that need its output are skipped.

    .venv/bin/python benchmarks/scale.py --arch llama --params 3.2e9   # ~14 min on 2 cores
    .venv/bin/python benchmarks/scale.py --arch mixtral --params 2.4e9 --hidden 2048 --intermediate 1408 \
        --fusion-ratio 0.0625    # 28 layers of 8 experts (each layer 3.3 % of the model), ~8 min
    .venv/bin/python benchmarks/scale.py --arch mixtral --params 2.4e9 --fusion-ratio 0.0625  # 10 layers
    .venv/bin/python benchmarks/scale.py --arch llama --params 3.2e9 --only shard,data --keep

Results (the table) go to stdout and to <cache>/scale-<arch>-<params>.json. Measured tables and
what dominates each stage's memory: benchmarks/README.md, section scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_backbone import MARK, _counters, _rusage_peak  # noqa: E402

GB = 1e9


# ----- child ---------------------------------------------------------------------------------
def child(payload: dict) -> dict:
    """Run one stage function (or the generator / the import floor) in this process."""
    t0 = time.perf_counter()
    c0 = _counters()
    kind = payload["stage"]
    if kind == "import":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from mlpfuse.stages import registry  # noqa: F401  (imports every stage module)

        result: dict = {}
    elif kind == "generate":
        import torch
        from generate import count_params, generate, make_config

        cfg = make_config(payload["arch"], payload["params"], hidden=payload.get("hidden"),
                          intermediate=payload.get("intermediate"), layers=payload.get("layers"))
        meta = generate(cfg, Path(payload["out"]), torch.bfloat16, shard_bytes=int(payload["shard_bytes"]),
                        overwrite=True)
        result = {"params": count_params(cfg), "shards": meta["shards"]}
    else:
        from mlpfuse.core.heap import bound_malloc_cache
        from mlpfuse.stages.registry import STAGES

        bound_malloc_cache()  # as execute_node does in every pipeline task
        sdef = STAGES[kind]
        cfg = sdef.config.model_validate(payload["config"])
        out = Path(payload["out"])
        out.mkdir(parents=True, exist_ok=True)
        result = sdef.run(cfg, {k: Path(v) for k, v in payload["inputs"].items()}, out)
    return {"seconds": time.perf_counter() - t0, "cpu": _counters()["cpu"] - c0["cpu"],
            "result": _small(result)}


def _small(obj, depth: int = 0):
    """The stage's result without long lists (per-layer reports)."""
    if isinstance(obj, dict):
        return {k: _small(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return obj if len(obj) <= 12 else f"[{len(obj)} items]"
    return obj


# ----- parent --------------------------------------------------------------------------------
def _blocks(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes allocated under ``path`` (st_blocks), each inode once; with ``seen``, only inodes
    not in it (which are then added)."""
    total = 0
    local: set[tuple[int, int]] = set()
    if not path.exists():
        return 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in local or (seen is not None and key in seen):
                continue
            local.add(key)
            total += st.st_blocks * 512
    if seen is not None:
        seen |= local
    return total


def run_child(name: str, payload: dict, logs: Path, env_extra: list[str], timeout: float) -> dict:
    """Run ``payload`` in a fresh interpreter; sample its RSS; return its result and peaks."""
    import psutil

    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kv.split("=", 1) for kv in env_extra)
    log = logs / f"{name}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)]
    t0 = time.perf_counter()
    peak = peak_anon = 0
    peak_at = 0.0
    timed_out = False
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                m = ps.memory_info()
                if m.rss > peak:
                    peak, peak_at = m.rss, time.perf_counter() - t0
                peak_anon = max(peak_anon, m.rss - m.shared)
            except psutil.Error:
                pass
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(0.05)
        out = proc.stdout.read()  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    res: dict = {"name": name, "wall": wall, "sampled_rss": peak, "sampled_anon": peak_anon, "peak_at": peak_at,
                 "log": str(log)}
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-3000:].strip().splitlines()
        res.update(ok=False, returncode=proc.returncode, timed_out=timed_out, error_tail=tail[-15:],
                   ru_maxrss=peak)
        return res
    res.update(json.loads(lines[-1][len(MARK):]), ok=True)
    return res


def plan(arch: str, n_layers: int, a) -> list[tuple[str, str, dict, dict[str, str]]]:
    """(node name, stage, config, {role: upstream node}) in run order."""
    from mlpfuse.stages.collect import CollectConfig
    from mlpfuse.stages.compress import CompressConfig
    from mlpfuse.stages.data import TokenizeConfig
    from mlpfuse.stages.evaluate import EvaluateConfig
    from mlpfuse.stages.export import ExportConfig
    from mlpfuse.stages.methods.refit import RefitConfig
    from mlpfuse.stages.shard import ShardConfig

    data = TokenizeConfig(corpus="shakespeare", block_size=a.block_size, calib_tokens=a.calib_tokens,
                          eval_tokens=a.eval_tokens)
    coll = CollectConfig(gram_max=a.gram_max)
    ev = EvaluateConfig(window=a.block_size, stride=a.block_size, batch_size=8)
    sc = {"shard": "shard", "collect": "collect"}
    fuse_layers = list(range(min(a.fusion_layers, n_layers)))
    cands: list[tuple[str, dict, dict[str, str]]] = [
        ("prune-activation", {"candidate": {"method": "prune", "criterion": "activation", "ratio": a.ratio}}, sc),
        ("prune-activation+refit", {"candidate": {"method": "prune", "criterion": "activation", "ratio": a.ratio},
                                    "refit": RefitConfig().model_dump()},
         {**sc, "unrefit": "compress.prune-activation"}),
        (f"fusion-L0-{fuse_layers[-1]}", {"candidate": {"method": "fusion", "ratio": a.fusion_ratio, "iters": a.fusion_iters,
                                                        "layers": fuse_layers}}, sc),
        ("moefy-compensated", {"candidate": {"method": "moefy", "branches": 8, "assignment": "importance",
                                             "op": "compensated", "keep_branches": 0.75}}, sc),
    ]
    start = n_layers // 2  # MoE layers merge as whole MoE blocks (experts matched across layers)
    cands.append((f"merge-{start}-{start + 2}", {"candidate": {"method": "merge", "start": start, "size": 3,
                                                               "permute": True}}, sc))
    drop = [n_layers - 3, n_layers - 2]
    cands.append((f"layer-drop-{drop[0]}-{drop[1]}", {"candidate": {"method": "layer_drop", "layers": drop}}, sc))
    nodes: list[tuple[str, str, dict, dict[str, str]]] = [
        ("shard", "shard", ShardConfig(model=str(a.ckpt)).model_dump(mode="json"), {}),
        ("data", "data", data.model_dump(mode="json"), {"shard": "shard"}),
        ("collect.part0", "collect_part", {**coll.model_dump(mode="json"), "worker": 0},
         {"shard": "shard", "data": "data"}),
        ("collect", "collect", coll.model_dump(mode="json"), {"shard": "shard", "part0": "collect.part0"}),
    ]
    for name, cfg, inputs in cands:
        nodes.append((f"compress.{name}", "compress", CompressConfig.model_validate(cfg).model_dump(mode="json"), inputs))
    chosen = "compress.prune-activation+refit"
    nodes += [
        ("evaluate.base", "evaluate", ev.model_dump(mode="json"), {"shard": "shard", "data": "data"}),
        ("evaluate.prune-activation+refit", "evaluate", ev.model_dump(mode="json"),
         {"shard": "shard", "data": "data", "overlay": chosen}),
        ("export.prune-activation+refit", "export", ExportConfig().model_dump(mode="json"),
         {"shard": "shard", "overlay": chosen}),
    ]
    return nodes


def _still_needed(node: str, rest: list[tuple[str, str, dict, dict[str, str]]]) -> bool:
    return any(node in inputs.values() for _, _, _, inputs in rest)


def report(res: dict) -> str:
    size = res["checkpoint_bytes"]
    hdr = (f"{'stage':<32} {'s':>7} {'CPU s':>7} {'peak RSS GB':>11} {'RSS/ckpt':>8} {'anon GB':>7} "
           f"{'anon/ckpt':>9} {'disk GB':>7}")
    lines = [
        f"{res['arch']}: {res['params'] / 1e9:.3f} B params, checkpoint {size / GB:.3f} GB bf16 in "
        f"{res['shards']} safetensors file(s) + index; {res['layers']} layers, hidden {res['hidden']}, "
        f"FF {res['intermediate']}" + (f", {res['experts']} experts" if res.get("experts") else ""),
        f"data: calib {res['args']['calib_tokens']} / eval {res['args']['eval_tokens']} tokens, block "
        f"{res['args']['block_size']}; collect gram_max {res['args']['gram_max']}; ratio {res['args']['ratio']}",
        hdr, "-" * len(hdr),
    ]
    for r in res["stages"]:
        if r.get("skipped"):
            lines.append(f"{r['name']:<32} skipped: {r['skipped']}")
            continue
        mark = "" if r["ok"] else ("  TIMEOUT" if r.get("timed_out") else f"  FAILED (exit {r.get('returncode')})")
        cpu = f"{r['cpu']:.0f}" if "cpu" in r else ""
        lines.append(
            f"{r['name']:<32} {r['wall']:>7.1f} {cpu:>7} {r['ru_maxrss'] / GB:>11.2f} {r['ru_maxrss'] / size:>8.3f} "
            f"{r['sampled_anon'] / GB:>7.2f} {r['sampled_anon'] / size:>9.3f} {r.get('disk', 0) / GB:>7.2f}{mark}")
    ok = [r for r in res["stages"] if r.get("ok") and r["name"] not in ("import", "generate")]
    worst = max(ok, key=lambda r: r["ru_maxrss"]) if ok else None
    over = [r["name"] for r in ok if r["ru_maxrss"] / size > 0.25]
    lines += [
        "",
        f"checkpoint cache {res['checkpoint_disk'] / GB:.2f} GB; work dir peak {res['work_peak'] / GB:.2f} GB "
        f"(written in all {res['work_written'] / GB:.2f} GB); cache total at peak "
        f"{(res['checkpoint_disk'] + res['work_peak']) / GB:.2f} GB; wall {res['wall'] / 60:.1f} min",
    ]
    if worst:
        lines.append(f"highest peak: {worst['name']} {worst['ru_maxrss'] / GB:.2f} GB = "
                     f"{worst['ru_maxrss'] / size:.3f} x checkpoint; over 0.25 x: {', '.join(over) or 'none'}")
    failed = [r for r in res["stages"] if not r.get("ok") and not r.get("skipped")]
    for r in failed:
        lines.append(f"{r['name']} failed; log {r['log']}; last lines:")
        lines += ["    " + ln for ln in r["error_tail"][-8:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("llama", "mixtral"), default="llama")
    p.add_argument("--params", type=float, default=3.2e9)
    p.add_argument("--shard-bytes", type=float, default=2e9, help="checkpoint file size")
    p.add_argument("--hidden", type=int, help="hidden size (default: by --params, see generate.py)")
    p.add_argument("--intermediate", type=int, help="FF (per-expert) intermediate size")
    p.add_argument("--layers", type=int, help="decoder layers (default: as many as --params allows)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/mlpfuse-scale"))
    p.add_argument("--calib-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--gram-max", type=int, default=0, help="collect's gram_max (stage default 8192)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of FF neurons kept by prune")
    p.add_argument("--fusion-layers", type=int, default=1, help="fusion compresses layers 0..N-1")
    p.add_argument("--fusion-ratio", type=float, default=0.25, help="fraction kept by fusion (k-means k)")
    p.add_argument("--fusion-iters", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated node names (prefixes) to run")
    p.add_argument("--stage-timeout", type=float, default=1200, help="seconds; a stage past it is killed")
    p.add_argument("--keep", action="store_true", help="keep the work dir (and every overlay)")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        res = child(json.loads(a.child))
        res["ru_maxrss"] = _rusage_peak()
        print(MARK + json.dumps(res, default=str), flush=True)
        return 0

    t_start = time.perf_counter()
    tag = f"{a.arch}-{a.params:.2g}".replace("+", "") + "".join(
        f"-{k[0]}{v}" for k, v in (("hidden", a.hidden), ("intermediate", a.intermediate), ("layers", a.layers)) if v)
    a.ckpt = a.cache / tag
    work = a.cache / f"work-{a.arch}"
    logs = a.cache / f"logs-{tag}"  # kept when the work dir is deleted
    if work.exists():
        shutil.rmtree(work)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    work.mkdir(parents=True)
    stages: list[dict] = []
    if not (a.ckpt / "generate.json").exists():
        print(f"generating {a.ckpt} ...", flush=True)
        r = run_child("generate", {"stage": "generate", "arch": a.arch, "params": a.params, "out": str(a.ckpt),
                                   "shard_bytes": a.shard_bytes, "hidden": a.hidden, "intermediate": a.intermediate,
                                   "layers": a.layers}, logs, a.child_env, a.stage_timeout)
        if not r["ok"]:
            print("\n".join(r["error_tail"]), file=sys.stderr)
            return 1
        stages.append(r)
    gmeta = json.loads((a.ckpt / "generate.json").read_text())
    c = gmeta["config"]
    size = sum(f.stat().st_size for f in a.ckpt.glob("*.safetensors"))
    res = {
        "arch": a.arch, "params": gmeta["params"], "checkpoint": str(a.ckpt), "checkpoint_bytes": size,
        "checkpoint_disk": _blocks(a.ckpt), "shards": gmeta["shards"], "layers": c["num_hidden_layers"],
        "hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "experts": c.get("num_local_experts"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
        "stages": stages,
    }
    print(f"checkpoint {a.ckpt}: {gmeta['params'] / 1e9:.3f} B params, {size / GB:.2f} GB", flush=True)
    nodes = plan(a.arch, c["num_hidden_layers"], a)
    only = [s for s in a.only.split(",") if s]
    if only:
        nodes = [n for n in nodes if any(n[0].startswith(o) for o in only)]
    seen: set[tuple[int, int]] = set()
    written = live = peak = 0
    done: dict[str, Path] = {}
    failed: set[str] = set()
    print("import ...", flush=True)
    stages.append(run_child("import", {"stage": "import"}, logs, a.child_env, a.stage_timeout))
    for k, (name, stage, cfg, roles) in enumerate(nodes):
        missing = [n for n in roles.values() if n not in done and not (work / n).exists()]
        if missing:
            why = f"needs {', '.join(missing)}" + (" (failed)" if set(missing) & failed else "")
            stages.append({"name": name, "skipped": why})
            failed.add(name)
            print(f"{name}: skipped ({why})", flush=True)
            continue
        out = work / name
        inputs = {role: str(done.get(n, work / n)) for role, n in roles.items()}
        print(f"{name} ...", flush=True)
        r = run_child(name, {"stage": stage, "config": cfg, "inputs": inputs, "out": str(out)},
                      logs, a.child_env, a.stage_timeout)
        r["stage"] = stage
        r["disk"] = _blocks(out, seen)
        written += r["disk"]
        live += r["disk"]
        peak = max(peak, live)
        stages.append(r)
        if r["ok"]:
            done[name] = out
            print(f"  {r['wall']:.1f} s, peak RSS {r['ru_maxrss'] / GB:.2f} GB = {r['ru_maxrss'] / size:.3f} x ckpt "
                  f"(anon {r['sampled_anon'] / GB:.2f} GB), disk {r['disk'] / GB:.2f} GB; "
                  f"{json.dumps(r['result'])[:300]}", flush=True)
        else:
            failed.add(name)
            print(f"  FAILED after {r['wall']:.1f} s (exit {r.get('returncode')}"
                  f"{', timed out' if r.get('timed_out') else ''}); log {r['log']}:", flush=True)
            print("\n".join("    " + ln for ln in r["error_tail"]), flush=True)
        for n in [n for n in done if n.startswith("compress.")]:  # overlays no later stage reads
            if not a.keep and not _still_needed(n, nodes[k + 1:]) and done[n].exists():
                live -= _blocks(done[n])
                shutil.rmtree(done[n])
        res.update(work_written=written, work_peak=peak, wall=time.perf_counter() - t_start)
        (a.cache / f"scale-{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    if not a.keep:
        shutil.rmtree(work)
    res.update(work_written=written, work_peak=peak, wall=time.perf_counter() - t_start)
    (a.cache / f"scale-{tag}.json").write_text(json.dumps(res, indent=1, default=str))
    print()
    print(report(res))
    print(f"\njson: {a.cache / f'scale-{tag}.json'}" + ("" if a.keep else f"; work dir {work} deleted"))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
