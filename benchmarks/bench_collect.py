"""collect on real SmolLM2-135M against a plain in-memory transformers forward with hooks, and
the Parquet read-back speed.

Each phase runs in its own child process (so each peak RSS is its own), on the same calibration
blocks (bundled Shakespeare, ``--tokens`` tokens in blocks of 256):

- ``collect``: the ``collect_part`` stage (one worker: streamed layer by layer from the shard,
  FF inputs x and features up / gate / hidden written to Parquet, float16, plus float64 sums and
  HᵀH), then the ``collect`` merge, as a pipeline task runs them (``TASK_ENV``: OpenMP threads
  wait passively; the task's heap bound, ``mlpfuse.core.heap``);
- ``hooks``: ``AutoModelForCausalLM.from_pretrained`` (float32, the whole model in memory) and a
  forward over the same batches with hooks that keep the same tensors (x, up, gate, hidden, as
  float16 numpy) in memory, run as a user would run it: what a user would write without mlpfuse;
- ``hooks-env``: the same with collect's settings (its environment and its heap policy);
- ``read``: one middle layer's features (every kind: up, gate, hidden) read back with
  ``mlpfuse.stages.collect.read_features`` (best of 5; MB/s of float16 feature bytes returned);
- ``encode``: every Parquet file collect wrote, read back (untimed) and written again with the
  stage's writer settings: the CPU time the Parquet encoding alone costs;
- ``parts``: each piece of the work collect does beyond the forward, priced alone in CPU seconds
  on tensors of the model's shapes (every layer, the same token count, collect's settings):
  concatenating the batches' FF inputs, the float64 sums, HᵀH, the float16 copies, building and
  encoding the Parquet tables, and checksumming the written files.

Both sides are timed after their model is loaded: the hooks' timer starts once
``from_pretrained`` has returned (the whole model in memory); collect's once its runner exists
(``collect-setup`` times building that runner alone: a skeleton on the meta device, in the
stage's first lines). Collect still reads each layer's weights from the shard inside its timer:
streaming them is how it runs without the whole model in memory. Throughput ratio = hooks
seconds / collect seconds (target >= 0.9); memory ratio = collect peak RSS / hooks peak RSS
(target <= 0.5). Each phase also reports its CPU seconds (user + system).

    .venv/bin/python benchmarks/bench_collect.py            # ~7 min on 2 cores (2 repeats)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m"


def _prepare(work: Path, tokens: int) -> dict[str, str]:
    from mlpfuse.stages import data, shard
    from mlpfuse.stages.data import corpus_key
    from mlpfuse.stages.model.checkpoint import resolve_source, source_key

    sh, dd = work / "shard", work / f"data-{tokens}"
    if not (sh / "shard.json").exists():
        shard.run(shard.ShardConfig(model=MODEL, source_key=source_key(resolve_source(MODEL))), {}, sh)
    if not (dd / "calib.parquet").exists():
        cfg = data.TokenizeConfig(corpus="shakespeare", corpus_key=corpus_key("shakespeare"), block_size=256,
                                  calib_tokens=tokens, eval_tokens=512)
        data.run(cfg, {"shard": sh}, dd)
    return {"shard": str(sh), "data": str(dd)}


def _phase_collect(paths: dict[str, str], out: Path) -> dict:
    import shutil

    from mlpfuse.core.heap import bound_malloc_cache
    from mlpfuse.stages import collect

    from mlpfuse.stages.model.runner import LayerStreamedModel

    bound_malloc_cache()
    shutil.rmtree(out, ignore_errors=True)
    t_setup = time.perf_counter()
    LayerStreamedModel(Path(paths["shard"]))  # what the stage builds first, timed alone
    setup = time.perf_counter() - t_setup
    t0 = time.perf_counter() + setup  # the stage builds it again inside: not counted twice
    cfg = collect.CollectConfig()
    collect.run_part(collect.CollectPartConfig(**cfg.model_dump(), worker=0),
                     {"shard": Path(paths["shard"]), "data": Path(paths["data"])}, out / "part0")
    collect.run_merge(cfg, {"shard": Path(paths["shard"]), "part0": out / "part0"}, out / "merged")
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (out / "part0").rglob("*") if f.is_file())
    return {"seconds": seconds, "bytes": size, "setup": setup}


def _phase_hooks(paths: dict[str, str], stage_heap: bool) -> dict:
    import contextlib

    from mlpfuse.core.heap import bound_malloc_cache, reuse_heap

    heap = contextlib.nullcontext()
    if stage_heap:  # the heap policy collect runs under: a task's bound, then collect's reuse
        bound_malloc_cache()
        heap = reuse_heap()
    with heap:
        return _hooks_forward(paths)


def _hooks_forward(paths: dict[str, str]) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from mlpfuse.stages.collect import CollectConfig
    from mlpfuse.stages.data import read_calib
    from mlpfuse.stages.model.checkpoint import resolve_source

    src = resolve_source(MODEL)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    load = time.perf_counter() - t_load
    t0 = time.perf_counter()  # after loading, as collect's timer
    kept: dict[str, list[np.ndarray]] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        kept.setdefault(name, []).append(t.detach().reshape(-1, t.shape[-1]).to(torch.float16).numpy())

    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        mlp.register_forward_pre_hook(lambda _m, args, i=i: keep(f"{i}.x", args[0]))
        mlp.up_proj.register_forward_hook(lambda _m, _a, out, i=i: keep(f"{i}.up", out))
        mlp.gate_proj.register_forward_hook(lambda _m, _a, out, i=i: keep(f"{i}.gate", out))
        mlp.down_proj.register_forward_pre_hook(lambda _m, args, i=i: keep(f"{i}.hidden", args[0]))
    calib = read_calib(Path(paths["data"]))
    bs = CollectConfig().batch_size
    with torch.no_grad():
        for a in range(0, len(calib), bs):
            model(torch.from_numpy(calib[a : a + bs]), use_cache=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": sum(x.nbytes for v in kept.values() for x in v), "load": load}


def _phase_read(out: Path) -> dict:
    from mlpfuse.stages.model.features import read_features

    merged = out / "merged"
    meta = json.loads((merged / "meta.json").read_text())
    layer = meta["num_layers"] // 2
    best, nbytes = float("inf"), 0
    for _ in range(5):  # every feature kind of the layer: ~100 MB, long enough to time on a shared machine
        t0 = time.perf_counter()
        nbytes = 0
        for kind in meta["features"]:
            _, feat = read_features(merged, layer, "mlp", kind)
            nbytes += feat.nbytes
            del feat
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "bytes": nbytes, "layer": layer, "mb_per_s": nbytes / best / 1e6}


def _phase_encode(out: Path) -> dict:
    import pyarrow.parquet as pq

    from mlpfuse.stages.collect import _write_parquet

    seconds, cpu, nbytes = 0.0, 0.0, 0
    target = out / "encode.parquet"
    for f in sorted((out / "part0").rglob("*.parquet")):
        table = pq.read_table(f)
        t0, c0 = time.perf_counter(), time.process_time()
        _write_parquet(table, target)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        nbytes += target.stat().st_size
        del table
    target.unlink(missing_ok=True)
    return {"seconds": seconds, "write_cpu": cpu, "bytes": nbytes, "mb_per_s": nbytes / seconds / 1e6}


def _phase_parts(paths: dict[str, str], out: Path) -> dict:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from mlpfuse.core.artifacts import _crc32
    from mlpfuse.core.heap import bound_malloc_cache, reuse_heap
    from mlpfuse.stages.collect import (
        CollectConfig,
        _gram,
        _stack_as,
        _sums,
        _table,
        _write_parquet,
    )
    from mlpfuse.stages.data import read_calib
    from mlpfuse.stages.model.runner import LayerStreamedModel

    cfg = LayerStreamedModel(Path(paths["shard"])).config
    calib = read_calib(Path(paths["data"]))
    n = int(calib.size)
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    rows = CollectConfig().batch_size * calib.shape[1]  # captures per layer arrive one batch at a time
    sizes = [min(rows, n - a) for a in range(0, n, rows)]
    caps = {k: [torch.randn(m, w, generator=g) for m in sizes]
            for k, w in (("x", h), ("up", inter), ("gate", inter), ("hidden", inter))}
    cpu: dict[str, float] = {k: 0.0 for k in ("cat x", "sums", "gram", "float16", "tables+encode", "checksum")}
    target = out / "parts.parquet"
    bound_malloc_cache()
    with reuse_heap(), threadpool_limits(1, user_api="blas"):  # as collect runs
        for _ in range(layers):
            c0 = time.process_time()
            x = torch.cat(caps["x"])
            c1 = time.process_time()
            for k in ("up", "gate", "hidden"):
                _sums(caps[k])
            c2 = time.process_time()
            _gram(caps["hidden"])
            c3 = time.process_time()
            half = {k: _stack_as(caps[k], torch.float16) for k in ("up", "gate", "hidden")}
            c4 = time.process_time()
            tok = np.arange(n, dtype=np.int64)
            _write_parquet(_table({"token": tok, **half}), target)
            _write_parquet(_table({"token": tok, "x": x.numpy()}), target.with_suffix(".x"))
            c5 = time.process_time()
            for f in (target, target.with_suffix(".x")):
                _crc32(f)  # a part marker's checksum
            c6 = time.process_time()
            for k, a, b in (("cat x", c0, c1), ("sums", c1, c2), ("gram", c2, c3), ("float16", c3, c4),
                            ("tables+encode", c4, c5), ("checksum", c5, c6)):
                cpu[k] += b - a
            del x, half
    target.unlink(missing_ok=True)
    target.with_suffix(".x").unlink(missing_ok=True)
    return {"seconds": sum(cpu.values()), "bytes": 0, "parts": cpu}


def _child(phase: str, paths: dict[str, str], out: Path) -> dict:
    t0 = time.process_time()
    r = {"collect": lambda: _phase_collect(paths, out), "hooks": lambda: _phase_hooks(paths, False),
         "hooks-env": lambda: _phase_hooks(paths, True),
         "read": lambda: _phase_read(out), "encode": lambda: _phase_encode(out),
         "parts": lambda: _phase_parts(paths, out)}[phase]()
    r["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["cpu"] = time.process_time() - t0  # this process's threads, user + system
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlpfuse-bench-collect"))
    ap.add_argument("--tokens", type=int, default=10240)
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternating collect / hooks / hooks-env runs; each keeps its fastest")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = a.work / f"collect-{a.tokens}"
    if a.child:
        print(json.dumps(_child(a.child, json.loads((a.work / "paths.json").read_text()), out)))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "paths.json").write_text(json.dumps(_prepare(a.work, a.tokens)))
    res = {}
    from mlpfuse.cluster.runtime_env import TASK_ENV

    stage_env = {**os.environ, **TASK_ENV}
    timed = ("collect", "hooks", "hooks-env")
    for phase in [*timed * max(1, a.repeats), "read", "encode", "parts"]:
        env = stage_env if phase in ("collect", "hooks-env") else dict(os.environ)
        proc = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--tokens", str(a.tokens),
                               "--child", phase], capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if phase not in res or r["seconds"] < res[phase]["seconds"]:  # this machine is shared: the fastest
            res[phase] = r
        print(f"{phase:<8} {r['seconds']:8.1f} s  cpu {r['cpu']:7.1f} s  peak RSS {r['peak_rss'] / 1e9:6.2f} GB  "
              f"{r['bytes'] / 1e6:9.1f} MB" + (f"  {r['mb_per_s']:.0f} MB/s" if "mb_per_s" in r else ""))
    c, h = res["collect"], res["hooks"]
    print(f"untimed: collect's runner built in {c['setup']:.2f} s; the hooks' model loaded in {h['load']:.1f} s")
    print(f"throughput collect / in-memory hooks = {h['seconds'] / c['seconds']:.2f}   (target >= 0.9); "
          f"with the hooks run in collect's environment too: {res['hooks-env']['seconds'] / c['seconds']:.2f}")
    print(f"peak RSS collect / in-memory hooks   = {c['peak_rss'] / h['peak_rss']:.2f}   (target <= 0.5)")
    print(f"Parquet read of layer {res['read']['layer']} features  = {res['read']['mb_per_s']:.0f} MB/s (target >= 500)")
    e = res["encode"]
    print(f"CPU seconds: collect {c['cpu']:.1f}, hooks {h['cpu']:.1f}; extra {c['cpu'] - h['cpu']:.1f}, of which "
          f"Parquet encoding alone {e['write_cpu']:.1f} ({e['bytes'] / 1e9:.2f} GB at {e['mb_per_s']:.0f} MB/s on one core)")
    parts = res["parts"]["parts"]
    print("CPU seconds of collect's extra work, each piece alone: "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + f"; total {sum(parts.values()):.1f}")
    (a.work / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
