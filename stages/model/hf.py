"""Hugging Face checkpoint I/O: the one writer of safetensors shards (stock and tied forms), the
tied form's spec (``mlpfuse_ties.json``), and the one loader of an export (``mlpfuse.load``)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlpfuse.core.errors import InputError
from mlpfuse.stages.model.checkpoint import stream_safetensors
from mlpfuse.stages.model.families import family_for, sync_conv1d_widths
from mlpfuse.stages.model.shards import build_skeleton

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TIES_FILE = "mlpfuse_ties.json"


STOCK_STEM = "model"


TIED_STEM = "mlpfuse-tied"




_ST_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ExportError(InputError):
    """The overlay cannot be expressed as a stock checkpoint (e.g. per-layer expert counts)."""


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size {text!r}: expected a size like '2GB', '500MB' or '1GiB'")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size {text!r} must be positive")
    return n


def _own(t: Tensor) -> Tensor:
    """A contiguous tensor that owns its storage (safetensors refuses shared storage)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_bytes`` (a tensor larger than that
    gets a shard of its own), then names them as transformers does: ``{stem}.safetensors``, or
    ``{stem}-00001-of-0000N.safetensors`` plus ``{stem}.safetensors.index.json``.

    ``spill()`` moves the tensors added so far to a temporary file beside the shards (call it after
    each layer): a shard is then assembled from those files tensor by tensor, in row chunks, so
    memory holds one layer, not one shard."""

    def __init__(self, out_dir: Path, stem: str, max_bytes: int):
        self.out_dir, self.stem, self.max_bytes = out_dir, stem, max_bytes
        self.items: list[tuple[str, tuple[int, ...], torch.dtype]] = []  # the open shard's tensors, in order
        self.where: dict[str, Tensor | Path] = {}  # in memory, or the spill file holding it
        self.spills: list[Path] = []
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_numel = 0

    def add(self, name: str, t: Tensor) -> None:
        if name in self.where or any(name in keys for _, keys in self.parts):
            raise ExportError(f"tensor {name!r} written twice")
        nbytes = t.numel() * t.element_size()
        if self.items and self.size + nbytes > self.max_bytes:
            self.flush()
        self.items.append((name, tuple(t.shape), t.dtype))
        self.where[name] = _own(t)
        self.size += nbytes
        self.total_bytes += nbytes
        self.total_numel += t.numel()

    def spill(self) -> None:
        held = {n: v for n, v in self.where.items() if isinstance(v, Tensor)}
        if not held:
            return
        path = self.out_dir / f".{self.stem}-spill{len(self.spills):05d}.safetensors"
        save_file(held, str(path))
        self.spills.append(path)
        self.where.update(dict.fromkeys(held, path))

    def _read(self, name: str) -> Tensor | Iterator[Tensor]:
        v = self.where[name]
        return v if isinstance(v, Tensor) else _row_chunks(v, name)

    def flush(self) -> None:
        if not self.items:
            return
        path = self.out_dir / f".{self.stem}-part{len(self.parts):05d}.safetensors"
        stream_safetensors(path, self.items, self._read)
        self.parts.append((path, sorted(n for n, _, _ in self.items)))
        for f in self.spills:  # every spilled tensor belonged to this shard
            f.unlink()
        self.items, self.where, self.spills, self.size = [], {}, [], 0

    def close(self, total_parameters: int, mode: int = 0o644) -> list[str]:
        """Name the shards (and write the index); ``mode``: their permissions (safetensors
        creates files readable by the owner only)."""
        self.flush()
        for path, _ in self.parts:
            path.chmod(mode)
        n = len(self.parts)
        if n == 0:
            raise ExportError("nothing to write")
        if n == 1:
            name = f"{self.stem}.safetensors"
            self.parts[0][0].rename(self.out_dir / name)
            return [name]
        names, weight_map = [], {}
        for k, (path, keys) in enumerate(self.parts):
            name = f"{self.stem}-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _row_chunks(path: Path, name: str, max_bytes: int = 32 << 20) -> Iterator[Tensor]:
    with safe_open(str(path), framework="pt") as f:
        sl = f.get_slice(name)
        shape = sl.get_shape()
        if len(shape) < 2:
            yield f.get_tensor(name)
            return
        step = max(1, max_bytes // max(1, math.prod(shape[1:]) * _ST_SIZES[sl.get_dtype()]))
        for a in range(0, shape[0], step):
            yield sl[a : a + step]


def revert_names(skeleton: PreTrainedModel, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """In-memory names -> the checkpoint names ``save_pretrained`` writes (per-expert MoE keys)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older/newer transformers: in-memory names also load
        return sd
    return revert_weight_conversion(skeleton, sd)


def weight_files(model_dir: Path, weights: str) -> list[Path]:
    if weights.endswith(".index.json"):
        index = json.loads((model_dir / weights).read_text())
        return [model_dir / f for f in sorted(set(index["weight_map"].values()))]
    return [model_dir / weights]


def stored_tensors(files: list[Path], *, load: bool = True) -> Iterator[tuple[str, Tensor | None]]:
    """(name, tensor) of every tensor in ``files``; ``load=False``: names only (tensor None)."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                yield k, (f.get_tensor(k) if load else None)


def load_export(path: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load an export. Stock form: ``from_pretrained``. Tied form: build the model from its config,
    load the stored tensors, and make every tied name the *same* ``nn.Parameter`` as its source."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_dir = Path(path)
    ties_path = model_dir / TIES_FILE
    cfg = AutoConfig.from_pretrained(model_dir)
    family = family_for(cfg)
    if not ties_path.exists():
        auto = AutoModelForCausalLM if family.causal else AutoModel
        if dtype is not None:
            return auto.from_pretrained(model_dir, dtype=dtype).eval()
        return auto.from_pretrained(model_dir).eval()

    spec = json.loads(ties_path.read_text())
    model = build_skeleton(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    for name, t in stored_tensors(weight_files(model_dir, spec["weights"])):
        assert t is not None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if name in params:
            _assign(model, name, torch.nn.Parameter(t, requires_grad=params[name].requires_grad))
        elif name in buffers:
            mod, leaf = _owner(model, name)
            mod._buffers[leaf] = t
        else:
            raise ExportError(f"{model_dir}: stored tensor {name!r} has no place in the model")
    for name, src in spec["ties"].items():
        _assign(model, name, model.get_parameter(src))
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    sync_conv1d_widths(model)  # the tied form stores each layer at its own FF width
    meta_left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if meta_left:
        raise ExportError(f"{model_dir}: no stored tensor for {meta_left[:5]}")
    return model.eval()


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    return model.get_submodule(mod_name), leaf


def _assign(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    mod, leaf = _owner(model, name)
    mod._parameters[leaf] = param


def write_shards(model_dir: Path, stem: str, groups: Iterable[Mapping[str, Tensor]], *,
                 total_parameters: int | Callable[[], int], max_bytes: int) -> tuple[list[str], int]:
    """Write every tensor of ``groups`` (each group, e.g. one layer, added in name order and then
    spilled to disk, so memory holds one group) as ``{stem}*.safetensors`` shards beside
    ``model_dir/config.json``, with its file mode. Returns (file names, tensor elements stored).
    ``total_parameters`` (the index's metadata) may be a callable read after the last group."""
    writer = ShardWriter(model_dir, stem, max_bytes)
    for group in groups:
        for name in sorted(group):
            writer.add(name, group[name])
        writer.spill()
    total = total_parameters() if callable(total_parameters) else total_parameters
    stored = writer.total_numel
    files = writer.close(total, mode=(model_dir / "config.json").stat().st_mode & 0o777)
    return files, stored


def write_ties_spec(model_dir: Path, files: list[str], *, windows: list[list[int]],
                    ties: Mapping[str, str]) -> None:
    """``mlpfuse_ties.json`` of a tied-form checkpoint: its weight files, the tied windows (layer
    indices) and, for every tensor not stored, the stored tensor it is."""
    weights = files[0] if len(files) == 1 else f"{TIED_STEM}.safetensors.index.json"
    (model_dir / TIES_FILE).write_text(json.dumps({
        "format": "mlpfuse-tied", "version": 1, "weights": weights,
        "windows": windows, "ties": dict(ties),
    }, indent=2) + "\n")


def copy_model_files(src: Path, dest: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy the files of checkpoint ``src`` that travel with the model (tokenizer, chat template,
    generation config, ...: everything but weights and the files a stage writes itself), and
    ``extra`` of its own files, that ``dest`` does not have yet."""
    from mlpfuse.stages.model.shards import model_files

    for f in [*model_files(src), *(src / name for name in extra)]:
        if f.exists() and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
