"""A run killed with SIGKILL during shard resumes: finished layer files are reused as they are,
and the result equals a fresh run's byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

from mlpfuse.orchestrator.cli import main


def _big_tiny_llama(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=48, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152,
                      tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _spec(tmp: Path, ckpt: Path, cache: Path) -> Path:
    spec = {"name": "r", "model": str(ckpt), "cache": str(cache), "output": str(tmp / f"out-{cache.name}"),
            "data": {"corpus": "shakespeare", "block_size": 32, "calib_tokens": 64, "eval_tokens": 64},
            "evaluate": {"window": 32, "stride": 32}}
    p = tmp / f"spec-{cache.name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _shard_files(cache: Path) -> dict[str, dict]:
    (manifest,) = (cache / "artifacts" / "shard").glob("*/manifest.json")
    return json.loads(manifest.read_text())["files"]


def test_sigkill_during_shard_resumes(tmp_path: Path, ray_local, smollm2_tokenizer: Path) -> None:
    ckpt = _big_tiny_llama(tmp_path / "ckpt")
    for f in smollm2_tokenizer.iterdir():  # the data stage tokenises with the checkpoint's tokenizer
        (ckpt / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "cache"
    spec = _spec(tmp_path, ckpt, cache)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlpfuse.orchestrator.cli", "run", str(spec)], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    staging = cache / "staging"
    deadline = time.time() + 120
    parts: list[Path] = []
    while time.time() < deadline:
        parts = list(staging.glob("shard-*/.parts/*.json"))
        if len(parts) >= 6:
            break
        time.sleep(0.02)
    # The whole run dies at once: the driver and every process it started (Ray's raylet, workers).
    victims = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for v in victims:
        try:
            v.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    assert 6 <= len(parts) < 48, f"kill landed outside shard ({len(parts)} parts)"
    time.sleep(1.0)
    (stage_dir,) = staging.glob("shard-*")
    done = {p.name: p.stat().st_ino for p in (stage_dir / "layers").glob("*.safetensors")
            if (stage_dir / ".parts" / f"layers__{p.name}.json").exists()}
    assert done

    assert main(["run", str(spec)]) == 0
    (art,) = (cache / "artifacts" / "shard").iterdir()
    result = json.loads((art / "manifest.json").read_text())["result"]
    assert result["layers_reused"] >= len(done)
    for name, ino in done.items():  # reused, not rewritten: same inode
        assert (art / "layers" / name).stat().st_ino == ino

    fresh = tmp_path / "fresh"
    assert main(["run", str(_spec(tmp_path, ckpt, fresh))]) == 0
    assert _shard_files(cache) == _shard_files(fresh)


def test_a_part_whose_bytes_changed_is_not_done(tmp_path: Path) -> None:
    from mlpfuse.core.artifacts import commit_part, part_done

    commit_part(tmp_path, "a/part.bin", lambda p: p.write_bytes(bytes(range(256)) * 64))
    assert part_done(tmp_path, "a/part.bin")
    data = bytearray((tmp_path / "a/part.bin").read_bytes())
    data[1000] ^= 1  # same size, one bit flipped
    (tmp_path / "a/part.bin").write_bytes(bytes(data))
    assert not part_done(tmp_path, "a/part.bin")
