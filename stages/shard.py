"""shard: a checkpoint -> one safetensors file per decoder layer, plus the rest (embeddings, norms,
head), config and tokenizer.

Layer files hold keys relative to the layer (``self_attn.q_proj.weight``) in the layout the
transformers modeling code holds in memory, so every later stage reads one small file per layer
and never the whole model. Safetensors and ``.bin`` checkpoints are read tensor by tensor; peak
memory is one layer. GGUF files go through transformers' own de-quantising conversion, which
materialises the model once (GGUF is not lazily readable).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from mlpfuse.core.artifacts import commit_part, part_done, write_json_atomic
from mlpfuse.core.errors import CheckpointError
from mlpfuse.stages.model.checkpoint import (
    LazyCheckpoint,
    ModelSource,
    resolve_source,
    stream_safetensors,
)
from mlpfuse.stages.model.families import FamilyAdapter, family_for
from mlpfuse.stages.model.shards import DTYPES, build_skeleton, layer_file, model_files


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    # Fingerprint of the source files, filled in by the planner so the cache key follows the weights.
    source_key: str = ""
    # Storage dtype of the shards; "auto" keeps the checkpoint's (GGUF: float32 after de-quantising).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


def _split_keys(family: FamilyAdapter, keys: list[str]) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Checkpoint keys -> {layer: {relative key: full key}} and the non-layer keys."""
    patterns = [re.compile("^" + re.escape(p).replace(r"\{\}", r"(\d+)")) for p in family.layer_prefixes]
    layers: dict[int, dict[str, str]] = defaultdict(dict)
    rest = []
    for k in keys:
        for pat in patterns:
            m = pat.match(k)
            if m:
                layers[int(m.group(1))][k[m.end():]] = k
                break
        else:
            rest.append(k)
    return dict(layers), rest


def _rest_name(key: str, expected: set[str], base_prefix: str) -> str | None:
    """Map a non-layer checkpoint key onto the skeleton's name (adding or removing the base prefix)."""
    if key in expected:
        return key
    if f"{base_prefix}.{key}" in expected:
        return f"{base_prefix}.{key}"
    if key.startswith(base_prefix + ".") and key[len(base_prefix) + 1:] in expected:
        return key[len(base_prefix) + 1:]
    return None


def _load_gguf(src: ModelSource) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, {k: v.detach() for k, v in model.state_dict().items()}, tokenizer


def _check_finite(layer: int, key: str, t: torch.Tensor) -> None:
    # in 16M-element pieces: a whole-tensor isfinite would allocate a bool per element
    if t.is_floating_point() and not all(torch.isfinite(c).all() for c in t.reshape(-1).split(1 << 24)):
        raise CheckpointError(f"layer {layer} tensor {key!r} holds NaN or inf values")


def _file_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors (shapes and dtypes, no data read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), dtype=f.get_tensor(k).dtype, device="meta")
                for k in f.keys()}


def _layer_plan(family: FamilyAdapter, keys: dict[str, str], lazy: LazyCheckpoint
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype, list[tuple[str, ...]]]] | None:
    """How to write each tensor of the layer's in-memory layout without materialising the layer:
    {key: (shape, dtype, row sources)}. A renamed checkpoint tensor has one source, streamed in row
    chunks; a fused legacy-MoE tensor has one source group per expert (``cat(gate_e, up_e)``).
    None when the family builds a tensor some other way (then the layer is materialised)."""
    metas = {}
    for rk, fk in keys.items():
        shape, dt = lazy.meta(fk)
        metas[rk] = torch.empty(shape, dtype=dt, device="meta")
    origin = {id(v): keys[rk] for rk, v in metas.items()}
    source = {k: origin[id(v)] for k, v in family.renamed(metas).items()}
    fused = family.legacy_experts(list(source))
    plan: dict[str, tuple[tuple[int, ...], torch.dtype, list[tuple[str, ...]]]] = {}
    for k, v in family.canonicalize(metas).items():
        if id(v) in origin:
            plan[k] = (tuple(v.shape), v.dtype, [(origin[id(v)],)])
        elif k in fused:
            plan[k] = (tuple(v.shape), v.dtype, [tuple(source[x] for x in g) for g in fused[k]])
        else:
            return None
    return plan


def _check_declared_size(hf_config: Any, trust_remote_code: bool, path: Path, stored: int) -> None:
    """Refuse a config that declares far more parameters than the weight files hold (absurd sizes
    in a hostile or broken config.json), before anything is allocated: the model is counted on the
    meta device, buffers included."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if family_for(hf_config).causal else AutoModel
    with init_empty_weights(include_buffers=True):
        meta = auto.from_config(hf_config, trust_remote_code=trust_remote_code)
    meta.tie_weights()
    declared = sum(p.numel() for p in meta.parameters())
    if declared > 2 * stored + 1_000_000:
        raise CheckpointError(
            f"{path}: config.json declares {declared:,} parameters but the weight files hold {stored:,} "
            "values: the config's sizes do not match its weights (refused before allocating anything)")


def run(config: ShardConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Write ``layers/NNNNN.safetensors``, ``rest.safetensors``, ``config.json``, tokenizer files and
    ``shard.json``. Finished layer files are kept across interrupted attempts."""
    from transformers import AutoConfig

    src = resolve_source(config.model)
    dtype = DTYPES.get(config.dtype)
    tokenizer = None
    lazy: LazyCheckpoint | None = None
    if src.format == "gguf":
        hf_config, tensors, tokenizer = _load_gguf(src)
        get = tensors.__getitem__
        keys = list(tensors)
    else:
        try:
            hf_config = AutoConfig.from_pretrained(src.path, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read config.json in {src.path}: {e}") from e
        lazy = LazyCheckpoint(src)
        get = lazy.get
        keys = lazy.keys()
    family = family_for(hf_config)
    n_layers = family.num_layers(hf_config)
    layer_keys, rest_keys = _split_keys(family, keys)
    missing = sorted(set(range(n_layers)) - set(layer_keys))
    if missing:
        raise CheckpointError(f"checkpoint {src.path} has no tensors for layers {missing[:8]}")

    _check_declared_size(hf_config, config.trust_remote_code, src.path,
                         sum(math.prod(lazy.meta(k)[0]) for k in keys) if lazy is not None
                         else sum(tensors[k].numel() for k in keys))
    skeleton = build_skeleton(hf_config, trust_remote_code=config.trust_remote_code)
    expected = set(skeleton.state_dict())
    base_prefix = str(skeleton.base_model_prefix)

    out_dir.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {"total": 0, "ff": 0, "layers": [0] * n_layers, "ff_layers": [0] * n_layers}
    reused = 0

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for i in tqdm(range(n_layers), desc="shard", unit="layer"):
        rel = layer_file(i)
        if part_done(out_dir, rel):
            reused += 1
            shapes = _file_shapes(out_dir / rel)
        else:
            plan = _layer_plan(family, layer_keys[i], lazy) if lazy is not None else None
            if plan is not None:
                # Renames only: each tensor is read in row chunks, checked, cast, written and
                # dropped in turn, so the stage holds one chunk of the layer at a time.
                specs = [(k, shape, dtype if dtype is not None and dt.is_floating_point else dt)
                         for k, (shape, dt, _) in sorted(plan.items())]

                def fetch(k: str, plan: dict = plan, i: int = i) -> Iterator[torch.Tensor]:
                    assert lazy is not None
                    sources = plan[k][2]
                    if len(sources) == 1 and len(sources[0]) == 1:
                        chunks: Iterator[torch.Tensor] = lazy.row_chunks(sources[0][0], max_bytes=8 << 20)
                    else:  # a fused expert tensor, one expert's slice at a time
                        chunks = (torch.cat([lazy.get(x) for x in g], 0)[None] for g in sources)
                    for chunk in chunks:
                        chunk = cast(chunk).contiguous()
                        _check_finite(i, k, chunk)
                        yield chunk

                def write(p: Path, specs: list = specs, fetch: Callable = fetch) -> None:
                    stream_safetensors(p, specs, fetch)

                commit_part(out_dir, rel, write)
            else:  # GGUF tensors (already in memory), or a layout the plan cannot stream
                sd = family.canonicalize({rk: get(fk) for rk, fk in layer_keys[i].items()})
                sd = {k: cast(v).contiguous() for k, v in sd.items()}
                for k, v in sd.items():
                    _check_finite(i, k, v)
                specs = [(k, tuple(v.shape), v.dtype) for k, v in sorted(sd.items())]
                def write_all(p: Path, sd: dict = sd, specs: list = specs) -> None:
                    stream_safetensors(p, specs, sd.__getitem__)

                commit_part(out_dir, rel, write_all)
                del sd
            shapes = {k: torch.empty(shape, dtype=dt, device="meta") for k, shape, dt in specs}
        params["layers"][i] = sum(v.numel() for v in shapes.values())
        params["ff_layers"][i] = sum(family.read_ff(hf_config, shapes, r).num_params()
                                     for r in family.ff_blocks(hf_config, shapes))

    # Non-layer tensors (embeddings, norms, head): name in the skeleton -> checkpoint key, streamed
    # into rest.safetensors one tensor at a time.
    rest: dict[str, str] = {}
    tie = bool(getattr(hf_config, "tie_word_embeddings", False))
    for k in rest_keys:
        name = _rest_name(k, expected, base_prefix)
        if name is not None and not (tie and name.endswith("lm_head.weight")):
            rest[name] = k
    layer_names = {n for n in expected if re.search(r"\.\d+\.", n) and n.startswith(family.layers_path)}
    # A head tied to the input embeddings is stored once (as the embeddings).
    tied = {n for n in expected - set(rest) - layer_names if n.endswith("lm_head.weight")}
    still_missing = sorted(expected - set(rest) - layer_names - tied)
    if still_missing:
        raise CheckpointError(f"checkpoint {src.path} lacks non-layer tensors {still_missing[:6]}")
    specs = []
    for name, k in sorted(rest.items()):
        if src.format == "gguf":
            shape, src_dtype = tuple(tensors[k].shape), tensors[k].dtype
        else:
            assert lazy is not None
            shape, src_dtype = lazy.meta(k)
        specs.append((name, shape, dtype if dtype is not None and src_dtype.is_floating_point else src_dtype))
    if not part_done(out_dir, "rest.safetensors"):
        def read(n: str) -> torch.Tensor | Iterator[torch.Tensor]:
            if src.format == "gguf":
                return get(rest[n])
            assert lazy is not None
            return lazy.row_chunks(rest[n])

        commit_part(out_dir, "rest.safetensors", lambda p: stream_safetensors(p, specs, read))
    params["rest"] = sum(math.prod(shape) for _, shape, _ in specs)
    params["total"] = params["rest"] + sum(params["layers"])
    params["ff"] = sum(params["ff_layers"])

    hf_config.save_pretrained(out_dir)
    for f in model_files(src.path):  # everything of the source that is not weights travels
        shutil.copy2(f, out_dir / f.name)
    if tokenizer is not None:  # a GGUF source: its tokenizer comes out of the file
        tokenizer.save_pretrained(out_dir)
    meta = {
        "model": config.model, "source_path": str(src.path), "format": src.format,
        "model_type": hf_config.model_type, "family": family.name, "num_layers": n_layers,
        "tied_head": sorted(tied), "params": params,
    }
    write_json_atomic(out_dir / "shard.json", meta)
    return {"num_layers": n_layers, "params": params["total"], "ff_params": params["ff"], "layers_reused": reused}


