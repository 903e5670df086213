"""The samples stage writes what transformers' own greedy generation writes, for the base model
and for a candidate (its overlay standing in for the base layers)."""

from __future__ import annotations

from pathlib import Path

import torch

from mlpfuse.stages import compress, samples, shard
from mlpfuse.stages.compress import CompressConfig


def _greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_continuations_match_transformers(tiny_lm: Path, tmp_path: Path) -> None:
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_lm)), {}, sd)
    cfg = samples.SamplesConfig(prompts=("The capital of France is", "def f(x):"), max_new_tokens=6)
    got = samples.run(cfg, {"shard": sd}, tmp_path / "s")
    assert (tmp_path / "s" / "samples.json").exists()
    for p in got["prompts"]:
        assert p["tokens"] == _greedy(tiny_lm, p["prompt"], 6)[: len(p["tokens"])] and p["tokens"]
    # A candidate: layer 2 dropped; the same prompts through its overlay.
    ov = tmp_path / "ov"
    compress.run(CompressConfig.model_validate({"candidate": {"method": "layer_drop", "layers": [2]}}), {"shard": sd}, ov)
    cand = samples.run(cfg, {"shard": sd, "overlay": ov}, tmp_path / "c")["prompts"][0]["tokens"]
    from transformers import AutoTokenizer

    from mlpfuse.stages.model.overlay import load_overrides
    from mlpfuse.stages.model.runner import LayerStreamedModel

    model = LayerStreamedModel(sd, overrides=load_overrides(ov))
    prompt = AutoTokenizer.from_pretrained(sd)(cfg.prompts[0], add_special_tokens=False)["input_ids"]
    for n in range(len(cand)):  # every token is the candidate's argmax after the ones before it
        assert int(model.logits(torch.tensor([prompt + cand[:n]]))[0, -1].argmax()) == cand[n]
