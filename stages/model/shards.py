"""The shard artifact's layout: one safetensors file per decoder layer (keys relative to the layer,
in the in-memory layout of the transformers modeling code), ``rest.safetensors`` for everything
else, ``shard.json`` (config, per-layer metadata), and the tokenizer files. Every later stage reads
a model through these names and never the whole checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlpfuse.stages.model.families import family_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_file(i: int) -> str:
    return f"layers/{i:05d}.safetensors"


def build_skeleton(config: Any, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The task model (causal LM, or base encoder) with parameters on the meta device and real
    buffers (rotary frequencies etc.), so nothing heavy is allocated."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    family = family_for(config)
    auto = AutoModelForCausalLM if family.causal else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def load_shard_meta(shard_dir: Path) -> dict:
    return json.loads((shard_dir / "shard.json").read_text())


def tensor_header(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors of their shapes and dtypes (only the header
    is read): what counting and planning need of a layer without its bytes."""
    from safetensors import safe_open

    from mlpfuse.stages.model.checkpoint import SAFETENSORS_DTYPES

    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), device="meta",
                               dtype=SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32))
                for k in f.keys()}


def stored_dtype(shard_dir: Path) -> torch.dtype:
    """The shard's stored floating-point precision (its embeddings'): an export's ``auto`` dtype."""
    floats = [t.dtype for t in tensor_header(shard_dir / "rest.safetensors").values() if t.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


#: Weight files (and their indexes) of a checkpoint directory: the shard re-writes them by layer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
#: Code is never carried (a bundled model lives in a Python package; remote code needs an opt-in).
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so")
#: Files a shard or an export writes itself, never carried over from a source directory.
OWN_FILES = frozenset({"config.json", "shard.json", "manifest.json", "README.md", ".gitattributes",
                       "mlpfuse_ties.json", "mlpfuse.yaml"})


def model_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory that travel with the model unchanged: tokenizer files,
    chat template, generation config, processor configs and whatever else a hub repository holds
    beside its weights (top level only)."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.name not in OWN_FILES
                  and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")
                  and not p.name.startswith(".") and p.suffix not in CODE_SUFFIXES)
