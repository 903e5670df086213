"""What a compressed MoE stores: counted by the planner vs written by each export form.

SmolLM2-135M's real weights upcycled into a 4-expert Mixtral-form model (every expert a copy of
the layer's MLP, router zero: the MoE computes the dense model exactly), then the MLP Fusion
example's candidate (``examples/smollm2-fuse.yaml``: layers 8-29 fused 1536 -> 384 per expert),
exported in the stock and the tied form. Prints the parameter count the planner uses for each form
(``count_params``, with the export's width multiples), what each export stored, its bytes, and
the largest logit difference between the two forms' models (loaded as a user would).

    .venv/bin/python benchmarks/moe_export.py [WORKDIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS = list(range(8, 30))


def upcycle(out: Path, experts: int = 4) -> Path:
    """SmolLM2-135M as a Mixtral-form MoE of ``experts`` copies of each MLP (exact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from mlpfuse.stages.model.checkpoint import resolve_source

    src = resolve_source("smollm2-135m")  # a GGUF file in its package
    dense = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_theta=getattr(c, "rope_theta", 10000.0), tie_word_embeddings=c.tie_word_embeddings,
                        num_local_experts=experts, num_experts_per_tok=2, bos_token_id=c.bos_token_id,
                        eos_token_id=c.eos_token_id, hidden_act=c.hidden_act)
    moe = MixtralForCausalLM(cfg).to(torch.float32)
    sd = dense.state_dict()
    new = moe.state_dict()
    for k in new:
        if ".mlp." in k:
            continue
        new[k] = sd[k]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], sd[p + "down_proj.weight"]
        new[p + "experts.gate_up_proj"] = torch.cat([gate, up], 0)[None].repeat(experts, 1, 1)
        new[p + "experts.down_proj"] = down[None].repeat(experts, 1, 1)
        new[p + "gate.weight"] = torch.zeros_like(new[p + "gate.weight"])
    moe.load_state_dict(new)
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file).save_pretrained(out)
    return out


def main(work: Path) -> None:
    import mlpfuse
    from mlpfuse.stages import compress, export, shard
    from mlpfuse.stages.model.params import base_blocks, recount

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "smollm2-moe4"
    if not (ckpt / "config.json").exists():
        upcycle(ckpt)
    sd = work / "shard"
    if not (sd / "shard.json").exists():
        shard.run(shard.ShardConfig(model=str(ckpt)), {}, sd)
    cand, result_file = work / "fusion", work / "fusion.json"
    if not result_file.exists():
        cand.mkdir(exist_ok=True)
        t0 = time.time()
        cfg = compress.CompressConfig.model_validate(
            {"candidate": {"method": "fusion", "ratio": 0.25, "layers": LAYERS, "iters": 10}})
        result_file.write_text(json.dumps(compress.run(cfg, {"shard": sd}, cand)))
        print(f"compress: {time.time() - t0:.1f} s")
    built = json.loads(result_file.read_text())
    shapes = base_blocks(sd)
    base = json.loads((sd / "shard.json").read_text())["params"]
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    logits = {}
    print(f"base: {base['total']:,} parameters")
    for tied in (False, True):
        ex = export.run(export.ExportConfig(tied=tied), {"shard": sd, "overlay": cand},
                        work / ("export-tied" if tied else "export-stock"))
        planned = recount(base, shapes, built, shapes.multiples())  # what the planner compares
        loaded = mlpfuse.load(Path(ex["path"]))
        n_loaded = sum(p.numel() for p in loaded.parameters())
        with torch.no_grad():
            logits[tied] = loaded(ids).logits
        del loaded
        key, pad = ("unique_params", "unique_padded_params") if tied else ("params", "padded_params")
        print(f"{ex['form']:5}: planner {planned[key]:,}  stored {ex['stored_params']:,}  loaded {n_loaded:,}  "
              f"padding {ex[pad]:,}  {ex['bytes'] / 1e9:.3f} GB")
    print(f"largest logit difference, stock vs tied: {float((logits[False] - logits[True]).abs().max()):.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mlpfuse-moe-export-")))
