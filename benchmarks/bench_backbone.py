"""The backbone's acceptance figures on a ≥ 2 GB checkpoint: shard-stage memory, streamed
evaluation memory and throughput against transformers' in-memory model.

A random-weight Llama checkpoint (bf16, ~1.1 B parameters = ~2.2 GB, SmolLM2 vocabulary; made by
``benchmarks/generate.py``) is cached under ``--cache`` (default /tmp/mlpfuse-bench) so reruns skip
generation. Every phase runs in its own subprocess so peak RSS is per phase: the child reports
``getrusage(RUSAGE_SELF).ru_maxrss`` and the parent samples the child's RSS with psutil every
20 ms (total and anonymous = RSS minus file-backed/shared pages, e.g. mmapped safetensors).

Phases:
  import     python + torch + transformers + stages imported, nothing else (the RSS floor)
  shard      ``mlpfuse.stages.shard.run`` on the checkpoint into a fresh directory
  streamed   ``LayerStreamedModel`` + ``mlpfuse.stages.evaluate.perplexity`` (float32 compute)
  in-memory  ``AutoModelForCausalLM.from_pretrained(ckpt, dtype=float32)`` over the same windows,
             the same batches, the same NLL code
Both evaluations score the same random-but-valid token ids (``--tokens``, windows of
``--window``/``--stride``, ``--batch-size``); their perplexities must agree (a correctness check).
``--repeats`` alternates streamed / in-memory runs and keeps each one's fastest, which evens out
the load other users put on a shared machine; the ratio is also given per CPU-second of each
process (less sensitive to that load). Throughput counts every token fed through the model
(windows x length), excluding model construction/loading (reported separately).
The shard and streamed phases fix glibc's mmap threshold at 1 MiB first, as every pipeline task
does (``mlpfuse.core.heap.bound_malloc_cache``); the in-memory baseline runs as a user would
run it. ``--child-env KEY=VALUE`` sets the environment of every phase.

Targets: shard peak RSS <= 0.25 x checkpoint size; streamed tokens/s >= 0.8 x in-memory.

    .venv/bin/python benchmarks/bench_backbone.py                 # 3-7 min on 2 shared cores
    .venv/bin/python benchmarks/bench_backbone.py --repeats 1 --profile
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
MARK = "BENCH_RESULT "


# ----- children ------------------------------------------------------------------------------
def _rusage_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _counters() -> dict[str, float]:
    """This process's CPU time, page faults and context switches so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": r.ru_utime + r.ru_stime, "majflt": r.ru_majflt, "minflt": r.ru_minflt,
            "vcsw": r.ru_nvcsw, "ivcsw": r.ru_nivcsw}


def _delta(before: dict[str, float]) -> dict[str, float]:
    after = _counters()
    return {k: after[k] - before[k] for k in before}


def _token_streams(ckpt: Path, n: int):
    import json as _json

    import torch

    vocab = _json.loads((ckpt / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    return [ids.numpy()]


class _Timer:
    def __init__(self):
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def add(self, key: str, dt: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + dt
        self.n[key] = self.n.get(key, 0) + 1

    def wrap(self, key: str, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t0)

        return inner


def child_generate(a) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from generate import count_params, generate, make_config

    cfg = make_config("llama", a.params)
    t0 = time.perf_counter()
    meta = generate(cfg, a.ckpt, torch.bfloat16, shard_bytes=int(a.shard_bytes), overwrite=True)
    return {"seconds": time.perf_counter() - t0, "params": count_params(cfg), "shards": meta["shards"]}


def child_import(a) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from mlpfuse.stages import evaluate, shard  # noqa: F401
    from mlpfuse.stages.model import runner  # noqa: F401

    return {"seconds": 0.0}


def child_shard(a) -> dict:
    from mlpfuse.core.heap import bound_malloc_cache
    from mlpfuse.stages import shard

    bound_malloc_cache()  # as execute_node does in every pipeline task

    if a.shard.exists():
        shutil.rmtree(a.shard)
    t0 = time.perf_counter()
    out = shard.run(shard.ShardConfig(model=str(a.ckpt)), {}, a.shard)
    return {"seconds": time.perf_counter() - t0, "layers": out["num_layers"]}


def _windows(a):
    from mlpfuse.stages.evaluate import EvaluateConfig, batches_by_length, sliding_windows

    cfg = EvaluateConfig(window=a.window, stride=a.stride, batch_size=a.batch_size)
    streams = _token_streams(a.ckpt, a.tokens)
    windows = sliding_windows(streams, cfg.window, cfg.stride, cfg.max_tokens)
    return cfg, streams, batches_by_length(windows, cfg.batch_size)


def child_streamed(a) -> dict:
    import torch

    from mlpfuse.core.heap import bound_malloc_cache
    from mlpfuse.stages.evaluate import perplexity
    from mlpfuse.stages.model.runner import LayerStreamedModel

    bound_malloc_cache()  # as execute_node does in every pipeline task

    cfg, streams, batches = _windows(a)
    fed = sum(int(ids.numel()) for ids, *_ in batches)
    t0 = time.perf_counter()
    model = LayerStreamedModel(a.shard)
    t_build = time.perf_counter() - t0

    # Where time goes: wrap the runner's steps on this instance (the runner calls them through self).
    tm = _Timer()
    model.layer_state = tm.wrap("read layer (safetensors)", model.layer_state)
    model.start = tm.wrap("start (embed + capture args)", model.start)
    model.finish = tm.wrap("finish (norm + head)", model.finish)
    apply = model.apply
    model.apply = tm.wrap("layer compute", apply)  # type: ignore[method-assign]
    layer_cm = model.layer

    from contextlib import contextmanager

    @contextmanager
    def timed_layer(i, state=None):
        t = time.perf_counter()
        cm = layer_cm(i, state)
        mod = cm.__enter__()
        tm.add("materialise layer (read + cast + set)", time.perf_counter() - t)
        try:
            yield mod
        finally:
            t = time.perf_counter()
            cm.__exit__(None, None, None)
            tm.add("release layer", time.perf_counter() - t)

    model.layer = timed_layer  # type: ignore[method-assign]

    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t1, c1 = time.perf_counter(), _counters()
    res = perplexity(model, streams, cfg)
    t_eval, counters = time.perf_counter() - t1, _delta(c1)
    if prof is not None:
        import io
        import pstats

        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        (a.cache / "profile-streamed.txt").write_text(buf.getvalue())
    tm.t["read layer (safetensors)"] = tm.t.get("read layer (safetensors)", 0.0)
    materialise = tm.t["materialise layer (read + cast + set)"]
    tm.t["cast + set (in materialise)"] = materialise - tm.t["read layer (safetensors)"]
    nested = ("read layer (safetensors)", "cast + set (in materialise)")
    tm.t["other (NLL, python)"] = t_eval - sum(v for k, v in tm.t.items() if k not in nested)
    return {
        "seconds": t_eval, "cpu_seconds": counters["cpu"], "counters": counters,
        "build_seconds": t_build, "tokens": fed, "scored": res["tokens"], "overhead": materialise + tm.t["release layer"],
        "nll": res["nll"], "perplexity": res["perplexity"], "breakdown": tm.t,
        "attn": model.config._attn_implementation, "threads": torch.get_num_threads(),
    }


def child_inmemory(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mlpfuse.stages.evaluate import _nll

    cfg, streams, batches = _windows(a)
    fed = sum(int(ids.numel()) for ids, *_ in batches)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32).eval()
    t_build = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), _counters()
    t_fwd = 0.0
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, n_target, _ in batches:
            t = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            t_fwd += time.perf_counter() - t
            x, c = _nll(logits, ids, n_target)
            nll, count = nll + x, count + c
            del logits
    t_eval, counters = time.perf_counter() - t1, _delta(c1)
    mean = nll / max(count, 1)
    import math

    return {
        "seconds": t_eval, "cpu_seconds": counters["cpu"], "counters": counters,
        "build_seconds": t_build, "tokens": fed, "scored": count, "nll": mean,
        "perplexity": math.exp(mean), "breakdown": {"forward": t_fwd, "other (NLL)": t_eval - t_fwd},
        "attn": model.config._attn_implementation, "threads": torch.get_num_threads(),
    }


CHILDREN = {
    "generate": child_generate, "import": child_import, "shard": child_shard,
    "streamed": child_streamed, "in-memory": child_inmemory,
}


# ----- parent --------------------------------------------------------------------------------
def run_phase(phase: str, a, passthrough: list[str]) -> dict:
    """Run one phase in a fresh interpreter; sample its RSS; return its result + peaks."""
    import psutil

    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kv.split("=", 1) for kv in a.child_env)
    log = a.cache / f"log-{phase}.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, *passthrough]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        ps = psutil.Process(proc.pid)
        peak = peak_anon = 0
        while proc.poll() is None:
            try:
                m = ps.memory_info()
                peak, peak_anon = max(peak, m.rss), max(peak_anon, m.rss - m.shared)
            except psutil.Error:
                pass
            time.sleep(0.02)
        out = proc.stdout.read()  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"phase {phase} failed (exit {proc.returncode}); log: {log}")
    res = json.loads(lines[-1][len(MARK):])
    res.update(wall=wall, sampled_rss=peak, sampled_anon=peak_anon)
    return res


def _ckpt_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=1.1e9, help="Llama size (1.1e9 -> ~2.2 GB bf16)")
    p.add_argument("--shard-bytes", type=float, default=2e9, help="checkpoint shard file size")
    p.add_argument("--cache", type=Path, default=Path("/tmp/mlpfuse-bench"))
    p.add_argument("--tokens", type=int, default=2048, help="token ids in the evaluation stream")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="alternating streamed/in-memory runs")
    p.add_argument("--profile", action="store_true", help="cProfile the streamed evaluation")
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--child-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every phase, e.g. MALLOC_MMAP_THRESHOLD_=1048576")
    p.add_argument("--phase", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tag = f"llama-{a.params:.2g}-s{a.shard_bytes:.0e}".replace("+", "")
    a.ckpt = a.ckpt or a.cache / tag
    a.shard = a.shard or a.cache / f"{tag}-shard"

    if a.phase:  # child
        res = CHILDREN[a.phase](a)
        res["ru_maxrss"] = _rusage_peak()
        print(MARK + json.dumps(res), flush=True)
        return 0

    a.cache.mkdir(parents=True, exist_ok=True)
    passthrough = [
        "--params", str(a.params), "--shard-bytes", str(a.shard_bytes), "--cache", str(a.cache),
        "--tokens", str(a.tokens), "--window", str(a.window), "--stride", str(a.stride),
        "--batch-size", str(a.batch_size), "--ckpt", str(a.ckpt), "--shard", str(a.shard),
    ] + (["--profile"] if a.profile else [])
    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    if not (a.ckpt / "generate.json").exists():
        print(f"generating {a.ckpt} ...", flush=True)
        results["generate"] = run_phase("generate", a, passthrough)
    else:
        print(f"cached checkpoint {a.ckpt}", flush=True)
    size = _ckpt_bytes(a.ckpt)
    gmeta = json.loads((a.ckpt / "generate.json").read_text())
    c = gmeta["config"]
    print(f"checkpoint: {gmeta['params'] / 1e9:.3f} B params, {size / 1e9:.3f} GB bf16 in "
          f"{gmeta['shards']} file(s); hidden {c['hidden_size']}, intermediate "
          f"{c['intermediate_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}", flush=True)
    for phase in ("import", "shard"):
        print(f"{phase} ...", flush=True)
        results[phase] = run_phase(phase, a, passthrough)
    runs: dict[str, list[dict]] = {"streamed": [], "in-memory": []}
    for r in range(a.repeats):
        for phase in ("streamed", "in-memory"):
            if phase == "in-memory" and a.skip_in_memory:
                continue
            print(f"{phase} (run {r + 1}/{a.repeats}) ...", flush=True)
            res = run_phase(phase, a, passthrough)
            c = res["counters"]
            print(f"  {res['tokens'] / res['seconds']:.1f} tokens/s, eval {res['seconds']:.1f} s "
                  f"(CPU {c['cpu']:.1f} s, {c['ivcsw']:.0f} preemptions, {c['majflt']:.0f} major faults), "
                  f"load {res['build_seconds']:.1f} s, peak RSS {res['ru_maxrss'] / 1e9:.2f} GB", flush=True)
            runs[phase].append(res)
    for phase, rs in runs.items():
        if rs:
            best = min(rs, key=lambda x: x["seconds"])
            best["ru_maxrss"] = max(x["ru_maxrss"] for x in rs)
            best["sampled_rss"] = max(x["sampled_rss"] for x in rs)
            best["sampled_anon"] = max(x["sampled_anon"] for x in rs)
            best["all_seconds"] = [x["seconds"] for x in rs]
            best["all_cpu"] = [x["cpu_seconds"] for x in rs]
            best["min_cpu"] = min(best["all_cpu"])
            results[phase] = best

    # ----- report ------------------------------------------------------------------------
    gb = 1e9
    print()
    print(f"checkpoint size {size / gb:.3f} GB (bf16); {a.tokens} token ids, window {a.window}, "
          f"stride {a.stride}, batch {a.batch_size}; repeats {a.repeats} (fastest kept); "
          f"torch threads {results.get('streamed', {}).get('threads', '?')}"
          + (f"; child env {' '.join(a.child_env)}" if a.child_env else ""))
    print("RSS: peak RSS = child's ru_maxrss; sampled = parent's 20 ms psutil samples; anon = RSS "
          "minus file-backed pages (mmapped safetensors)")
    hdr = (f"{'phase':<10} {'wall s':>7} {'load s':>7} {'run s':>7} {'tokens/s':>9} "
           f"{'peak RSS GB':>11} {'RSS/ckpt':>8} {'sampled':>8} {'anon':>6} {'anon/ckpt':>9}")
    print(hdr)
    print("-" * len(hdr))
    for phase in ("generate", "import", "shard", "streamed", "in-memory"):
        r = results.get(phase)
        if r is None:
            continue
        tps = f"{r['tokens'] / r['seconds']:.1f}" if "tokens" in r else ""
        load = f"{r['build_seconds']:.1f}" if "build_seconds" in r else ""
        ev = f"{r['seconds']:.1f}" if r["seconds"] else ""
        print(f"{phase:<10} {r['wall']:>7.1f} {load:>7} {ev:>7} {tps:>9} {r['ru_maxrss'] / gb:>11.2f} "
              f"{r['ru_maxrss'] / size:>8.3f} {r['sampled_rss'] / gb:>8.2f} {r['sampled_anon'] / gb:>6.2f} "
              f"{r['sampled_anon'] / size:>9.3f}")
    print()
    sh = results["shard"]
    print(f"shard peak RSS / checkpoint      = {sh['ru_maxrss'] / size:.3f}   (target <= 0.25) "
          f"{'PASS' if sh['ru_maxrss'] / size <= 0.25 else 'MISS'}; above the import floor: "
          f"{(sh['ru_maxrss'] - results['import']['ru_maxrss']) / size:.3f}")
    st = results["streamed"]
    print(f"streamed peak RSS / checkpoint   = {st['ru_maxrss'] / size:.3f}; above the import floor: "
          f"{(st['ru_maxrss'] - results['import']['ru_maxrss']) / size:.3f}")
    if "in-memory" in results:
        im = results["in-memory"]
        ratio = (st["tokens"] / st["seconds"]) / (im["tokens"] / im["seconds"])
        e2e = (st["tokens"] / (st["seconds"] + st["build_seconds"])) / (
            im["tokens"] / (im["seconds"] + im["build_seconds"]))
        print(f"in-memory peak RSS / checkpoint  = {im['ru_maxrss'] / size:.3f}")
        print(f"throughput streamed / in-memory  = {ratio:.3f}   (target >= 0.8) "
              f"{'PASS' if ratio >= 0.8 else 'MISS'}; including model load/construction: {e2e:.3f}")
        cpu_ratio = (st["tokens"] / st["min_cpu"]) / (im["tokens"] / im["min_cpu"])
        print(f"  per CPU-second (least CPU of each; less sensitive to other users' load): {cpu_ratio:.3f}")
        print(f"  expected on an idle machine, from the streaming overhead alone: "
              f"{1 / (1 + st['overhead'] / (st['seconds'] - st['overhead'])):.3f}")
        print(f"runs (eval s): streamed {[round(x, 1) for x in st['all_seconds']]}, "
              f"in-memory {[round(x, 1) for x in im['all_seconds']]}; CPU s: streamed "
              f"{[round(x, 1) for x in st['all_cpu']]}, in-memory {[round(x, 1) for x in im['all_cpu']]}")
        print(f"perplexity: streamed {st['perplexity']:.2f}, in-memory {im['perplexity']:.2f} "
              f"(nll differ by {abs(st['nll'] - im['nll']):.2e}); attention {st['attn']} / {im['attn']}")
    print()
    print("where the time goes (fastest run):")
    print(f"  streaming overhead (materialise + release layers) = {st['overhead']:.2f} s = "
          f"{st['overhead'] / st['seconds']:.1%} of the streamed evaluation")
    for phase in ("streamed", "in-memory"):
        r = results.get(phase)
        if r:
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["breakdown"].items())
            print(f"  {phase}: load {r['build_seconds']:.1f} s; eval {r['seconds']:.1f} s "
                  f"(CPU {r['cpu_seconds']:.1f} s) = {parts}")
    print("  wall per phase: " + ", ".join(f"{k} {v['wall']:.0f} s" for k, v in results.items())
          + f"; total {time.perf_counter() - t_start:.0f} s")
    if a.profile and (a.cache / "profile-streamed.txt").exists():
        print("\ncProfile of the last streamed evaluation (by own time):")
        print((a.cache / "profile-streamed.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
