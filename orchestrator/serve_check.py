"""``mlpfuse serve-check EXPORT``: does vLLM serve the export as transformers runs it?

vLLM pins its own torch and transformers, so it lives in a venv of its own (``scripts/setup_vllm.sh``
makes ``.venv-vllm/`` with vLLM's CPU build). This module runs in mlpfuse's environment: it loads
the export with transformers, generates greedily on a few prompts and keeps each generated token's
log-probability, then runs the same prompts through vLLM in the other venv (a small script on
stdin/stdout, :data:`VLLM_PROBE`) and compares: the greedy tokens must agree, and the largest
log-probability difference over the agreed tokens is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpfuse.core.errors import InputError

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
)

#: Run by the vLLM venv's Python: reads {"model", "prompts", "max_tokens", "dtype"} on stdin,
#: writes ``MLPFUSE_RESULT {"tokens": [[...]], "logprobs": [[...]], "seconds": s}`` on a line of stdout.
VLLM_PROBE = r"""
import json, sys, time
req = json.loads(sys.stdin.read())
from vllm import LLM, SamplingParams
t0 = time.time()
llm = LLM(model=req["model"], dtype=req["dtype"], max_model_len=req["max_len"], enforce_eager=True,
          seed=0, tensor_parallel_size=1)
params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=1)
outs = llm.generate(req["prompts"], params)
tokens, logprobs = [], []
for o in outs:
    c = o.outputs[0]
    tokens.append(list(c.token_ids))
    logprobs.append([float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)])
print("MLPFUSE_RESULT " + json.dumps({"tokens": tokens, "logprobs": logprobs, "seconds": time.time() - t0}),
      flush=True)
"""


@dataclass(frozen=True)
class ServeCheck:
    """Per prompt: the greedy tokens of both, how many agree from the start, and the largest
    log-probability difference over those; overall pass/fail and timings."""

    prompts: list[str]
    hf_tokens: list[list[int]]
    vllm_tokens: list[list[int]]
    agreed: list[int]
    max_logprob_diff: float
    hf_seconds: float
    vllm_seconds: float

    @property
    def ok(self) -> bool:
        return all(a == len(t) for a, t in zip(self.agreed, self.hf_tokens, strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "prompts": self.prompts, "agreed_tokens": self.agreed,
                "generated_tokens": [len(t) for t in self.hf_tokens], "max_logprob_diff": self.max_logprob_diff,
                "hf_seconds": round(self.hf_seconds, 2), "vllm_seconds": round(self.vllm_seconds, 2)}


def default_python() -> Path:
    """The vLLM venv's Python: ``$MLPFUSE_VLLM_PYTHON``, else ``.venv-vllm`` of the checkout."""
    env = os.environ.get("MLPFUSE_VLLM_PYTHON")
    return Path(env) if env else Path.cwd() / ".venv-vllm" / "bin" / "python"


def _hf_greedy(model_dir: Path, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:].tolist()
        lps = [float(torch.log_softmax(s[0].double(), -1)[t]) for s, t in zip(out.scores, new, strict=False)]
        tokens.append(new)
        logprobs.append(lps)
    return tokens, logprobs


def serve_check(export: str | Path, *, python: str | Path | None = None, prompts: tuple[str, ...] = PROMPTS,
                max_tokens: int = 16, timeout: float = 900) -> ServeCheck:
    """Compare vLLM's greedy generation of the stock export at ``export`` with transformers'."""
    model_dir = Path(export).expanduser().resolve()
    if not (model_dir / "config.json").exists():
        raise InputError(f"{model_dir} is not a model directory (no config.json)")
    if (model_dir / "mlpfuse_ties.json").exists():
        raise InputError(f"{model_dir} is the tied form, which only mlpfuse.load reads; vLLM serves the stock "
                         "form (export: stock)")
    py = Path(python) if python is not None else default_python()
    if not py.exists():
        raise InputError(f"no vLLM environment at {py}: run `bash scripts/setup_vllm.sh` (or set "
                         "MLPFUSE_VLLM_PYTHON to a Python that has vLLM)")
    t0 = time.time()
    hf_tokens, hf_lps = _hf_greedy(model_dir, list(prompts), max_tokens)
    hf_seconds = time.time() - t0
    cfg = json.loads((model_dir / "config.json").read_text())
    req = {"model": str(model_dir), "prompts": list(prompts), "max_tokens": max_tokens, "dtype": "float32",
           "max_len": min(int(cfg.get("max_position_embeddings", 2048)), 2048)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1"}
    run = subprocess.run([str(py), "-c", VLLM_PROBE], input=json.dumps(req), capture_output=True, text=True,
                         env=env, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"vLLM could not serve {model_dir} (exit {run.returncode}):\n{run.stderr[-4000:]}")
    line = next((x for x in run.stdout.splitlines() if x.startswith("MLPFUSE_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM gave no result for {model_dir}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    got = json.loads(line.removeprefix("MLPFUSE_RESULT "))
    agreed, diff = [], 0.0
    for a, b, la, lb in zip(hf_tokens, got["tokens"], hf_lps, got["logprobs"], strict=True):
        n = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agreed.append(n)
        diff = max([diff, *(abs(x - y) for x, y in zip(la[:n], lb[:n], strict=True))])
    return ServeCheck(list(prompts), hf_tokens, got["tokens"], agreed, diff, hf_seconds, float(got["seconds"]))


def main(export: str, python: str | None, max_tokens: int) -> int:
    result = serve_check(export, python=python, max_tokens=max_tokens)
    for p, a, n in zip(result.prompts, result.agreed, result.hf_tokens, strict=True):
        print(f"  {p!r}: {a}/{len(n)} greedy tokens agree")
    print(f"largest log-probability difference (vLLM vs transformers): {result.max_logprob_diff:.2e}; "
          f"transformers {result.hf_seconds:.1f}s, vLLM {result.vllm_seconds:.1f}s")
    print(json.dumps(result.as_dict()), file=sys.stderr if not result.ok else sys.stdout)
    return 0 if result.ok else 1
