"""Shared fixtures: tiny random checkpoints of every family, real SmolLM2/MiniLM shards, and one
embedded Ray for the session (stopped by this process at the end)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# model_type -> tiny config kwargs (random weights: structure and exactness only, never quality).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128),
    "gemma": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=128),
    "gemma3_text": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=128, sliding_window=4),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
    "opt": dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                word_embed_proj_dim=32),
    "mixtral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, vocab_size=128),
    "bert": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=128),
}


def make_tiny(model_type: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random checkpoint of ``model_type`` (and a tokenizer-free config) at ``path``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    auto.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny(mt, root / mt) for mt in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real SmolLM2-135M weights, sharded once for the session."""
    from mlpfuse.stages import shard

    out = tmp_path_factory.mktemp("smollm2") / "shard"
    shard.run(shard.ShardConfig(model="smollm2-135m"), {}, out)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray on 127.0.0.1 for the whole session; ray.shutdown stops what it started.
    Its workers start without any object-store client settings (``s3_server``'s), as on a cluster
    joined by address: a run must hand its tasks what they need to reach its store."""
    import ray

    from mlpfuse.orchestrator.store import CLIENT_ENV_VARS

    saved = {k: os.environ.pop(k) for k in CLIENT_ENV_VARS if k in os.environ}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    finally:
        os.environ.update(saved)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer (from the bundled GGUF), saved as a plain tokenizer directory."""
    from transformers import AutoTokenizer

    from mlpfuse.stages.model.checkpoint import resolve_source

    src = resolve_source("smollm2-135m")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file).save_pretrained(out)
    return out


def tiny_llama_with_tokenizer(path: Path, tokenizer_dir: Path, *, layers: int, hidden: int = 32,
                              intermediate: int = 64) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (so vocab 49152, tied embeddings): for
    pipeline runs that tokenise real text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def write_corpus(path: Path, docs: int = 6) -> Path:
    """A small plain-text corpus of ``docs`` documents."""
    path.mkdir()
    for i in range(docs):
        (path / f"doc{i}.txt").write_text(" ".join(f"word{j % 97} line {i} of the text" for j in range(400)))
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tinylm")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in smollm2_tokenizer.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


S3_BUCKET = "mlpfuse-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket, S3_BUCKET;
    yields the environment that points clients at it (also set in this process while it runs).
    Stopped by pid afterwards."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        end = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > end or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
        os.environ.update(env)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and anything it started
        proc.wait(timeout=10)
