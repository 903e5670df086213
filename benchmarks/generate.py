"""Random-weight checkpoints of any size, written to disk tensor by tensor (never the whole model).

``generate(config, out_dir)`` writes what a Hugging Face hub checkpoint looks like:
``config.json``, safetensors shards ``model-0000i-of-0000n.safetensors`` of at most
``shard_bytes`` each (a single tensor larger than that gets a shard of its own) with
``model.safetensors.index.json``, and a tokenizer (SmolLM2's, vocabulary 49152, by default).

The safetensors format is written directly (8-byte little-endian header length, JSON header,
raw tensor bytes): the header is computed from the shapes alone, then every tensor is drawn in
row chunks of at most ``CHUNK_BYTES`` and streamed to the file, so peak memory is one chunk
(~64 MB) whatever the model size. Values: linear/embedding weights ~ N(0, std²) (std 0.02 keeps
activations finite), norm weights 1, biases 0. Each tensor has its own seeded generator, so the
weights depend on the seed and the tensor's name only.

Tensor names are exactly what ``AutoModelForCausalLM.from_pretrained`` reads: the in-memory
names of the model (taken from a meta-device instance built from ``config``), except for Mixtral,
which is written in the *legacy per-expert* layout that Mixtral hub checkpoints use
(``model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight``, ``...block_sparse_moe.gate.weight``);
transformers 5 fuses those on load. A tied head is not written (as ``save_pretrained`` does).

    .venv/bin/python benchmarks/generate.py --arch llama --params 2.2e9 --out DIR
    .venv/bin/python benchmarks/generate.py --arch mixtral --params 3e9 --out DIR --experts 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 2_000_000_000
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "ones" | "zeros"

    def numel(self) -> int:
        return math.prod(self.shape)


# ----- which tensors -------------------------------------------------------------------------
def _init_kind(name: str, shape: tuple[int, ...]) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return "zeros"
    if len(shape) == 1 and "norm" in name:
        return "ones"
    return "normal"


def in_memory_specs(config: Any) -> list[TensorSpec]:
    """The tensors ``save_pretrained`` would write for ``config``, with in-memory names (tied
    parameters once), from a model built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kept = {n for n, _ in model.named_parameters()}  # tied parameters listed once
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    specs = []
    for name, t in model.state_dict().items():
        if name in tied or (name in every and name not in kept):
            continue
        shape = tuple(int(s) for s in t.shape)
        specs.append(TensorSpec(name, shape, _init_kind(name, shape)))
    return specs


def _mixtral_legacy(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Fused in-memory Mixtral experts -> the per-expert hub layout (w1 gate, w3 up, w2 down)."""
    out = []
    for s in specs:
        name = s.name
        if ".mlp.experts.gate_up_proj" in name:  # [E, 2I, H]: gate rows, then up rows
            prefix = name.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            n_exp, two_i, hidden = s.shape
            for e in range(n_exp):
                out.append(TensorSpec(f"{prefix}.{e}.w1.weight", (two_i // 2, hidden), "normal"))
                out.append(TensorSpec(f"{prefix}.{e}.w3.weight", (two_i // 2, hidden), "normal"))
        elif ".mlp.experts.down_proj" in name:  # [E, H, I]
            prefix = name.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            n_exp, hidden, inter = s.shape
            for e in range(n_exp):
                out.append(TensorSpec(f"{prefix}.{e}.w2.weight", (hidden, inter), "normal"))
        elif ".mlp.gate.weight" in name:
            out.append(TensorSpec(name.replace(".mlp.gate.", ".block_sparse_moe.gate."), s.shape, s.init))
        else:
            out.append(s)
    return out


def checkpoint_specs(config: Any) -> list[TensorSpec]:
    """The tensors of a hub checkpoint for ``config``, in file order."""
    specs = in_memory_specs(config)
    if config.model_type == "mixtral":
        specs = _mixtral_legacy(specs)
    return specs


def count_params(config: Any) -> int:
    return sum(s.numel() for s in in_memory_specs(config))


# ----- configs of a given size ---------------------------------------------------------------
# (largest parameter count, hidden, dense intermediate, heads, kv heads); MoE experts get half the
# dense intermediate size each.
_SIZES = (
    (0.4e9, 1024, 2816, 16, 4),
    (1.6e9, 2048, 5632, 32, 4),  # TinyLlama-1.1B shape
    (5e9, 2048, 8192, 32, 8),
    (12e9, 4096, 14336, 32, 8),  # Llama-3-8B shape
    (float("inf"), 8192, 28672, 64, 8),
)


def make_config(
    arch: str, params: float, *, vocab_size: int = 49152, hidden: int | None = None,
    intermediate: int | None = None, layers: int | None = None, heads: int | None = None,
    kv_heads: int | None = None, experts: int = 8, top_k: int = 2, tie: bool = False,
    max_positions: int = 4096, dtype: str = "bfloat16",
) -> Any:
    """A ``arch`` (llama | mixtral) config of about ``params`` parameters (or the given sizes)."""
    from transformers import AutoConfig

    _, h, inter, nh, nkv = next(row for row in _SIZES if params <= row[0])
    h = hidden or h
    if hidden and not heads:
        nh, nkv = max(1, h // 64), max(1, min(nkv, h // 64))
    nh, nkv = heads or nh, kv_heads or nkv
    if arch == "mixtral" and not intermediate:
        inter //= 2
    inter = intermediate or inter
    kw: dict[str, Any] = dict(
        hidden_size=h, intermediate_size=inter, num_attention_heads=nh, num_key_value_heads=nkv,
        vocab_size=vocab_size, tie_word_embeddings=tie, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, dtype=dtype,
    )
    if arch == "mixtral":
        kw.update(num_local_experts=experts, num_experts_per_tok=top_k)
    elif arch != "llama":
        raise ValueError(f"unknown arch {arch!r}; expected llama or mixtral")
    if layers is None:
        one = count_params(AutoConfig.for_model(arch, num_hidden_layers=1, **kw))
        two = count_params(AutoConfig.for_model(arch, num_hidden_layers=2, **kw))
        per_layer, base = two - one, 2 * one - two
        layers = max(1, round((params - base) / per_layer))
    return AutoConfig.for_model(arch, num_hidden_layers=layers, **kw)


# ----- writing -------------------------------------------------------------------------------
def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _chunks(spec: TensorSpec, dtype: torch.dtype, std: float, seed: int):
    """The tensor's bytes, in row chunks of at most CHUNK_BYTES (C order)."""
    cols = spec.shape[-1] if spec.shape else 1
    rows = spec.numel() // max(cols, 1)
    item = torch.empty(0, dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // max(cols * item, 1))
    g = torch.Generator().manual_seed(_seed(seed, spec.name))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        if spec.init == "ones":
            t = torch.ones(n, cols, dtype=dtype)
        elif spec.init == "zeros":
            t = torch.zeros(n, cols, dtype=dtype)
        else:
            t = torch.empty(n, cols, dtype=dtype).normal_(0.0, std, generator=g)
        yield t.view(torch.uint8).numpy()  # native (little-endian) byte order, as safetensors


def write_safetensors(
    path: Path, specs: list[TensorSpec], dtype: torch.dtype, *, std: float = 0.02, seed: int = 0,
) -> int:
    """Write one safetensors file holding ``specs``, streaming each tensor; returns its size."""
    item = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        size = s.numel() * item
        header[s.name] = {"dtype": ST_DTYPES[dtype], "shape": list(s.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            for chunk in _chunks(s, dtype, std, seed):
                f.write(memoryview(chunk))
        written = f.tell()
    assert written == 8 + len(raw) + offset, (path, written)
    return written


def plan_shards(specs: list[TensorSpec], item: int, shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy packing in file order; a tensor larger than ``shard_bytes`` gets its own shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        b = s.numel() * item
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += b
    return shards


def copy_tokenizer(source: str | Path, out_dir: Path) -> None:
    """``source``: ``smollm2-135m`` (the bundled GGUF's tokenizer) or a tokenizer directory."""
    from transformers import AutoTokenizer

    if str(source) == "smollm2-135m":
        from mlpfuse.stages.model.checkpoint import resolve_source

        src = resolve_source("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    else:
        tok = AutoTokenizer.from_pretrained(source)
    tok.save_pretrained(out_dir)


def generate(
    config: Any, out_dir: Path | str, dtype: torch.dtype = torch.bfloat16, *,
    shard_bytes: int = DEFAULT_SHARD_BYTES, std: float = 0.02, seed: int = 0,
    tokenizer: str | Path | None = "smollm2-135m", overwrite: bool = False, progress: bool = False,
) -> dict:
    """Write a random-weight checkpoint for ``config`` at ``out_dir``; returns what was written
    (also saved as ``generate.json``). Written to ``<out_dir>.partial`` and renamed when complete,
    so an existing ``out_dir`` is always a whole checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --force to replace it)")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()

    specs = checkpoint_specs(config)
    item = torch.empty(0, dtype=dtype).element_size()
    shards = plan_shards(specs, item, shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(tmp / fname, group, dtype, std=std, seed=seed)
        for s in group:
            weight_map[s.name] = fname
            total += s.numel() * item
        if progress:
            print(f"  {fname}: {len(group)} tensors, {(tmp / fname).stat().st_size / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config.dtype = {v: k for k, v in DTYPE_NAMES.items()}[dtype]
    config.save_pretrained(tmp)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp)
    meta = {
        "model_type": config.model_type,
        "params": sum(s.numel() for s in specs),
        "bytes": total,
        "shards": n,
        "dtype": config.dtype,
        "std": std,
        "seed": seed,
        "config": config.to_diff_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "generate.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("llama", "mixtral"), default="llama")
    p.add_argument("--params", type=float, default=1.1e9, help="target parameter count")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bfloat16")
    p.add_argument("--shard-bytes", type=float, default=DEFAULT_SHARD_BYTES)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49152, help="49152 matches the SmolLM2 tokenizer")
    p.add_argument("--tie", action="store_true", help="tie the head to the input embeddings")
    p.add_argument("--std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="smollm2-135m", help="smollm2-135m, a directory, or none")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    cfg = make_config(
        a.arch, a.params, vocab_size=a.vocab, hidden=a.hidden, intermediate=a.intermediate,
        layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, experts=a.experts, top_k=a.top_k,
        tie=a.tie, dtype=a.dtype,
    )
    n = count_params(cfg)
    size = n * torch.empty(0, dtype=DTYPE_NAMES[a.dtype]).element_size()
    print(f"{a.arch}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers -> {n / 1e9:.3f} B params, {size / 1e9:.2f} GB {a.dtype}",
          file=sys.stderr)
    meta = generate(
        cfg, a.out, DTYPE_NAMES[a.dtype], shard_bytes=int(a.shard_bytes), std=a.std, seed=a.seed,
        tokenizer=None if a.tokenizer.lower() == "none" else a.tokenizer, overwrite=a.force,
        progress=True,
    )
    print(json.dumps({k: v for k, v in meta.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
