"""benchmarks/generate.py writes checkpoints that transformers loads as its own: exact key names
and shapes (Llama; Mixtral in the legacy per-expert hub layout), and the sharded result runs
through mlpfuse's streamed runner to the same logits."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import TINY_CONFIGS

_spec = importlib.util.spec_from_file_location(
    "bench_generate", Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
)
gen = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["bench_generate"] = gen  # dataclasses look their module up
_spec.loader.exec_module(gen)  # type: ignore[union-attr]


def _config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **extra})


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def _assert_clean(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info.get(key))


def _checkpoint_keys(path: Path) -> dict[str, tuple[int, ...]]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shapes = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / fname), framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == fname
                shapes[k] = tuple(f.get_slice(k).get_shape())
    assert set(shapes) == set(index["weight_map"])
    return shapes


@pytest.mark.parametrize("tie", [False, True])
def test_llama_loads_with_exact_keys(tmp_path: Path, tie: bool) -> None:
    cfg = _config("llama", tie_word_embeddings=tie)
    out = tmp_path / "ckpt"
    meta = gen.generate(cfg, out, torch.bfloat16, shard_bytes=16_000, tokenizer=None)
    assert meta["shards"] > 1  # small shard size: several files and the index
    assert not (tmp_path / "ckpt.partial").exists()
    shapes = _checkpoint_keys(out)
    assert ("lm_head.weight" in shapes) == (not tie)

    model, info = _load(out)
    _assert_clean(info)
    sd = model.state_dict()
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    expected = {k for k in sd if not (tie and k == "lm_head.weight")}
    assert set(shapes) == expected
    # Values: norms 1, weights small normal, all finite; the head is tied when asked.
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.01
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_safetensors_layout_is_standard(tmp_path: Path) -> None:
    """The hand-written files: 8-byte aligned header, contiguous data, same bytes as torch wrote."""
    cfg = _config("llama")
    out = tmp_path / "ckpt"
    gen.generate(cfg, out, torch.bfloat16, tokenizer=None)
    (fname,) = {v for v in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()}
    raw = (out / fname).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert 8 + n + ends[-1][1] == len(raw)
    from safetensors.torch import load_file

    again = tmp_path / "again"
    gen.generate(cfg, again, torch.bfloat16, tokenizer=None)  # deterministic for a seed
    a, b = load_file(str(out / fname)), load_file(str(again / fname))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixtral_legacy_layout_loads_and_streams(tmp_path: Path) -> None:
    from mlpfuse.stages import shard
    from mlpfuse.stages.model.runner import LayerStreamedModel

    cfg = _config("mixtral")
    out = tmp_path / "ckpt"
    gen.generate(cfg, out, torch.bfloat16, shard_bytes=40_000, tokenizer=None)
    shapes = _checkpoint_keys(out)
    n_exp, inter, hidden = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe"
        assert shapes[f"{p}.gate.weight"] == (n_exp, hidden)
        for e in range(n_exp):
            assert shapes[f"{p}.experts.{e}.w1.weight"] == (inter, hidden)
            assert shapes[f"{p}.experts.{e}.w3.weight"] == (inter, hidden)
            assert shapes[f"{p}.experts.{e}.w2.weight"] == (hidden, inter)
    assert not any(".mlp." in k for k in shapes)

    model, info = _load(out)
    _assert_clean(info)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    sharded = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(out)), {}, sharded)
    got = LayerStreamedModel(sharded).logits(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_tokenizer_copied(tmp_path: Path, smollm2_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    cfg = _config("llama", vocab_size=49152)
    out = tmp_path / "ckpt"
    gen.generate(cfg, out, torch.bfloat16, tokenizer=smollm2_tokenizer)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == cfg.vocab_size
    assert max(tok("To be, or not to be")["input_ids"]) < cfg.vocab_size
    with pytest.raises(FileExistsError):
        gen.generate(cfg, out, torch.bfloat16, tokenizer=None)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_make_config_hits_the_size(arch: str) -> None:
    for target in (0.3e9, 2.2e9, 7e9):
        cfg = gen.make_config(arch, target)
        assert abs(gen.count_params(cfg) / target - 1) < 0.15, (arch, target)
    assert gen.make_config("llama", 2.2e9).hidden_size == 2048
