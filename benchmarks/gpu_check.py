"""The stages on one GPU, called as plain functions (no Ray, DeepSpeed or faiss needed): what a
lent GPU machine with only PyTorch and transformers can check in a few minutes.

    shard -> data -> collect -> compress (prune + refit; MLP Fusion with torch k-means) -> evaluate

on SmolLM2-135M (the bundled checkpoint, or ``--model DIR``), all under the compute a pipeline
task holding a GPU gets (``resources.precision: auto``: the checkpoint's stored precision, float32
here for the dequantised GGUF, or ``--precision bfloat16``). It reports:

- base perplexity on the device in bf16 vs on the CPU in float32 (target: within 0.5 %);
- collect's throughput against a plain in-memory transformers forward with hooks keeping the
  same tensors, on the same device and in the same precision, both timed after their model is
  loaded (target on a GPU: collect >= 0.8x);
- each candidate's perplexity on the device, and every stage's seconds.

    python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tokens 2048   # a smoke run anywhere

What it needs beyond PyTorch and transformers: pydantic, lap, scipy, pyarrow, safetensors, gguf,
tqdm, threadpoolctl, psutil, filelock, fsspec (wheels to carry where they are missing), and the
model and corpus (``--model``/``--corpus`` where the bundled packages are not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, *a, **kw):  # noqa: ANN001, ANN202 - a tiny local helper
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def _hooks_forward(model_dir: Path, calib, device: str, dtype, batch: int) -> tuple[float, float]:  # noqa: ANN001
    """(load seconds, forward seconds) of transformers with hooks keeping x, up, gate, hidden as
    float16 on the host: what a user writes without mlpfuse."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    load = time.perf_counter() - t0
    kept: list = []

    def keep(t: torch.Tensor) -> None:
        kept.append(t.detach().reshape(-1, t.shape[-1]).to(torch.float16).cpu().numpy())

    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.register_forward_pre_hook(lambda _m, args: keep(args[0]))
        mlp.up_proj.register_forward_hook(lambda _m, _a, out: keep(out))
        mlp.gate_proj.register_forward_hook(lambda _m, _a, out: keep(out))
        mlp.down_proj.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(calib), batch):
            model(torch.from_numpy(calib[a : a + batch]).to(device), use_cache=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return load, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=10240, help="calibration tokens")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlpfuse-gpu-check"))
    ap.add_argument("--out", type=Path, help="where result.json goes (default: --work)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    import torch

    from mlpfuse.core.compute import Compute, use_compute
    from mlpfuse.stages import collect, compress, data, evaluate, export, shard
    from mlpfuse.stages.data import corpus_key, read_calib
    from mlpfuse.stages.model.checkpoint import model_key
    from mlpfuse.stages.model.overlay import load_overrides
    from mlpfuse.stages.model.runner import LayerStreamedModel

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": a.device, "precision": a.precision, "seconds": {}}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    sec = res["seconds"]
    sh, dd = w / "shard", w / "data"
    if not (sh / "shard.json").exists():
        _, sec["shard"] = _timed(shard.run, shard.ShardConfig(model=a.model, source_key=model_key(a.model)), {}, sh)
    if not (dd / "calib.parquet").exists():
        cfg = data.TokenizeConfig(corpus=a.corpus, corpus_key=corpus_key(a.corpus), block_size=256,
                                  calib_tokens=a.tokens, eval_tokens=a.eval_tokens)
        _, sec["data"] = _timed(data.run, cfg, {"shard": sh}, dd)
    ev = evaluate.EvaluateConfig(window=256, stride=256)

    # Base perplexity: float32 on the CPU, then the device's compute.
    res["base_cpu_float32"], sec["evaluate_cpu"] = _timed(lambda: evaluate.evaluate_model(sh, dd, ev)["perplexity"])
    gpu = Compute(a.device, a.precision)
    with use_compute(gpu):
        res["base_device"], sec["evaluate_device"] = _timed(lambda: evaluate.evaluate_model(sh, dd, ev)["perplexity"])
    res["base_ratio"] = res["base_device"] / res["base_cpu_float32"]

    # collect vs a plain forward with hooks, same device and precision, both after loading.
    import shutil

    cc = collect.CollectConfig()
    for d in ("part0", "collect"):
        shutil.rmtree(w / d, ignore_errors=True)
    with use_compute(gpu):
        dtype = LayerStreamedModel(sh).dtype
        (_, t_part) = _timed(collect.run_part, collect.CollectPartConfig(**cc.model_dump(), worker=0),
                             {"shard": sh, "data": dd}, w / "part0")
        (_, t_merge) = _timed(collect.run_merge, cc, {"shard": sh, "part0": w / "part0"}, w / "collect")
    sec["collect"] = t_part + t_merge
    base_export = w / "base-export"
    if not (base_export / "model" / "config.json").exists():
        export.run(export.ExportConfig(), {"shard": sh}, base_export)
    load, fwd = _hooks_forward(base_export / "model", read_calib(dd), a.device, dtype, cc.batch_size)
    sec["hooks_load"], sec["hooks_forward"] = load, fwd
    res["collect_vs_hooks"] = fwd / sec["collect"]

    # Candidates on the device: activation-aware pruning with the refit, MLP Fusion (torch k-means).
    cands = {
        "prune+refit": {"candidate": {"method": "prune", "criterion": "activation", "ratio": 0.8},
                        "refit": {}},
        "fusion": {"candidate": {"method": "fusion", "ratio": 0.8, "iters": 10}},
    }
    res["candidates"] = {}
    for name, c in cands.items():
        out = w / f"compress-{name}"
        shutil.rmtree(out, ignore_errors=True)
        with use_compute(gpu):
            _, t_build = _timed(compress.run, compress.CompressConfig.model_validate(c),
                                {"shard": sh, "collect": w / "collect", "data": dd}, out)
            ppl, t_eval = _timed(lambda o=out: evaluate.evaluate_model(sh, dd, ev, overrides=load_overrides(o))["perplexity"])
        res["candidates"][name] = {"perplexity": ppl, "build_s": t_build, "eval_s": t_eval}

    out_dir = a.out or w
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    ok = abs(res["base_ratio"] - 1) < 0.005
    print(f"base perplexity {a.device} {a.precision} / cpu float32 = {res['base_ratio']:.4f} "
          f"({'within' if ok else 'OUTSIDE'} 0.5 %); collect / hooks throughput = {res['collect_vs_hooks']:.2f} "
          f"(target >= 0.8 on a GPU)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
