"""vLLM serves what mlpfuse exports (opt-in: ``-m vllm``; needs ``bash scripts/setup_vllm.sh``).

vLLM's CPU build, in its own venv, generates greedily on a few prompts from each stock export and
must pick the tokens transformers picks, with log-probabilities within 1e-3: the demo's kind of
winner (pruned and refit SmolLM2), an MLP Fusion and an MLPMoE export of SmolLM2, and a compressed
Mixtral-form MoE.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlpfuse.orchestrator.serve_check import default_python, serve_check
from mlpfuse.stages import compress, export, shard

pytestmark = pytest.mark.vllm

LAYERS = list(range(4, 26))


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    py = default_python()  # $MLPFUSE_VLLM_PYTHON, or .venv-vllm of the checkout (the tests run from its root)
    if not py.exists():
        pytest.fail(f"no vLLM environment at {py}: run bash scripts/setup_vllm.sh first")
    return py


def _stock(shard_dir: Path, tmp: Path, name: str, candidate: dict) -> Path:
    ov = tmp / f"ov-{name}"
    ov.mkdir()
    compress.run(compress.CompressConfig.model_validate({"candidate": candidate}), {"shard": shard_dir}, ov)
    return Path(export.run(export.ExportConfig(), {"shard": shard_dir, "overlay": ov}, tmp / f"ex-{name}")["path"])


@pytest.mark.parametrize("name,candidate", [
    ("prune", {"method": "prune", "criterion": "magnitude", "ratio": 0.75}),
    ("fusion", {"method": "fusion", "ratio": 0.5, "layers": LAYERS, "iters": 5}),
    ("moefy", {"method": "moefy", "branches": 8, "op": "compensated", "keep_branches": 0.75, "layers": LAYERS}),
])
def test_vllm_serves_smollm2_exports(name: str, candidate: dict, smollm2_shard: Path, tmp_path: Path,
                                     vllm_python: Path) -> None:
    result = serve_check(_stock(smollm2_shard, tmp_path, name, candidate), python=vllm_python, max_tokens=12)
    print(f"\n[serve-check] {name}: {result.as_dict()}")
    assert result.ok, result.as_dict()
    assert result.max_logprob_diff < 1e-3


def test_vllm_serves_a_compressed_moe(smollm2_tokenizer: Path, tmp_path: Path, vllm_python: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=49152,
                        max_position_embeddings=512, tie_word_embeddings=True)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the default init: greedy choices far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    src = tmp_path / "moe"
    model.save_pretrained(src)
    for f in smollm2_tokenizer.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(src)), {}, sd)
    exported = _stock(sd, tmp_path, "moe", {"method": "prune", "criterion": "magnitude", "ratio": 0.5})
    result = serve_check(exported, python=vllm_python, max_tokens=12)
    print(f"\n[serve-check] moe: {result.as_dict()}")
    assert result.ok, result.as_dict()
    assert result.max_logprob_diff < 1e-3
