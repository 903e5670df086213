"""The layer-streamed runner equals the in-memory transformers model, for every family."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mlpfuse.stages import shard
from mlpfuse.stages.model.families import family_for
from mlpfuse.stages.model.runner import SKIP, LayerStreamedModel
from mlpfuse.stages.model.shards import layer_file
from tests.conftest import TINY_CONFIGS


def _reference(path: Path, ids: torch.Tensor, model_type: str) -> torch.Tensor:
    from transformers import AutoModel, AutoModelForCausalLM

    if model_type == "bert":
        return AutoModel.from_pretrained(path).eval()(ids).last_hidden_state
    return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_matches_in_memory(model_type: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[model_type])), {}, out)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _reference(tiny_checkpoints[model_type], ids, model_type)
    got = LayerStreamedModel(out).logits(ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_low_precision_vocab_tables_stay_stored(model_type: str, tiny_checkpoints: dict[str, Path],
                                                tmp_path: Path) -> None:
    """A bfloat16 checkpoint run in float32: the embedding and head tables stay bfloat16 in memory,
    and the logits equal the model loaded wholly in float32."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if model_type == "bert" else AutoModelForCausalLM
    bf16 = tmp_path / "bf16"
    cls.from_pretrained(tiny_checkpoints[model_type], dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(bf16)), {}, out)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out32 = cls.from_pretrained(bf16, dtype=torch.float32).eval()(ids)
        ref = out32.last_hidden_state if model_type == "bert" else out32.logits
    lm = LayerStreamedModel(out)
    assert lm.model.get_input_embeddings().weight.device.type == "meta"  # loaded when a batch needs it
    got = lm.logits(ids)
    assert lm.model.get_input_embeddings().weight.dtype == torch.bfloat16
    if model_type != "bert":
        assert lm.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    if lm.family.moe is not None:  # fused expert tensors stay stored while their layer runs
        with lm.layer(0) as layer:
            experts = layer.get_submodule(lm.family.moe.path)
            assert experts.down_proj.stored.dtype == torch.bfloat16
            assert experts.down_proj[0].dtype == torch.float32


def test_one_layer_resident(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, out)
    lm = LayerStreamedModel(out)
    resident = []

    def count(i: int, layer: torch.nn.Module, states: list) -> None:
        resident.append(sum(1 for m in lm.layers for p in m.parameters() if p.device.type != "meta"))

    lm.run([lm.start(torch.zeros(1, 5, dtype=torch.long))], on_layer=count)
    n_layer_params = len(list(lm.layers[0].parameters()))
    assert resident == [n_layer_params] * lm.num_layers
    assert all(p.device.type == "meta" for p in lm.layers.parameters())


def test_skip_layer_equals_identity(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Dropping a layer through an override equals a model built without that layer."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, out)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    del model.model.layers[1]
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    got = LayerStreamedModel(out, overrides={1: SKIP}).logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_real_smollm2_matches_in_memory(smollm2_shard: Path) -> None:
    """Real weights: the streamed model equals transformers' own model loaded from the GGUF."""
    from transformers import AutoModelForCausalLM

    from mlpfuse.stages.model.checkpoint import resolve_source

    src = resolve_source("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    got = LayerStreamedModel(smollm2_shard).logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4
    assert family_for(model.config).name == "llama"


def test_real_minilm_matches_in_memory(tmp_path: Path) -> None:
    from transformers import AutoModel

    from mlpfuse.stages.model.checkpoint import resolve_source

    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model="minilm-l6"), {}, out)
    ref_model = AutoModel.from_pretrained(resolve_source("minilm-l6").path).eval()
    ids = torch.randint(0, 30000, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ref_model(ids).last_hidden_state
    got = LayerStreamedModel(out).logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_streamed_perplexity_equals_direct(model_type: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Sliding-window perplexity (batched by length, only the scored positions' logits computed)
    equals scoring every window with transformers, token by token."""
    import math

    import numpy as np
    from transformers import AutoModelForCausalLM

    from mlpfuse.stages.evaluate import EvaluateConfig, perplexity, sliding_windows

    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[model_type])), {}, out)
    rng = np.random.default_rng(0)
    streams = [rng.integers(0, 128, n) for n in (70, 33, 9)]
    config = EvaluateConfig(window=16, stride=6, batch_size=3)
    got = perplexity(LayerStreamedModel(out), streams, config)

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[model_type]).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, n in sliding_windows(streams, config.window, config.stride):
            logp = model(torch.from_numpy(ids)[None]).logits[0].log_softmax(-1)
            for t in range(len(ids) - n, len(ids)):
                nll -= logp[t - 1, int(ids[t])].item()
            count += n
    assert got["tokens"] == count == sum(len(s) - 1 for s in streams)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_shard_files_equal_the_checkpoint_tensors(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Layer files hold the checkpoint's own tensors, read in row chunks with plain file reads."""
    from safetensors.torch import load_file

    from mlpfuse.stages.model.checkpoint import LazyCheckpoint, resolve_source

    src = tiny_checkpoints["llama"]
    shard.run(shard.ShardConfig(model=str(src)), {}, tmp_path / "s")
    full = load_file(str(src / "model.safetensors"))
    layer = load_file(str(tmp_path / "s" / layer_file(1)))
    assert layer.keys() == {k[len("model.layers.1."):] for k in full if k.startswith("model.layers.1.")}
    for k, v in layer.items():
        assert torch.equal(v, full[f"model.layers.1.{k}"])
    lazy = LazyCheckpoint(resolve_source(str(src)))
    name = "model.embed_tokens.weight"
    chunks = list(lazy.row_chunks(name, max_bytes=1000))
    assert len(chunks) > 1 and torch.equal(torch.cat(chunks), full[name])


def test_shard_names_a_non_finite_tensor_and_commits_nothing_for_it(tiny_checkpoints: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mlpfuse.core.artifacts import part_done
    from mlpfuse.core.errors import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][3, 2] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "s"
    with pytest.raises(CheckpointError, match=r"layer 1 tensor 'mlp.down_proj.weight' holds NaN"):
        shard.run(shard.ShardConfig(model=str(bad)), {}, out)
    assert part_done(out, layer_file(0)) and not part_done(out, layer_file(1))
    assert not (out / layer_file(1)).exists()
