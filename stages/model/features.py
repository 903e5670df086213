"""The collect artifact, read back: per-layer Parquet feature tables (``features/L{i}/{block}``,
``inputs/L{i}``: one part per data-parallel worker, rows keyed by calibration token) and float64
statistics (``stats/L{i}.safetensors``: per block count, sums, sums of squares, HᵀH). Every stage
that reads collect's output goes through these functions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file as load_np


def stats_file(i: int) -> str:
    return f"stats/L{i:05d}.safetensors"


# ----- reading a collect artifact -------------------------------------------------------------
def feature_parts(collect_dir: Path, sub: str) -> list[Path]:
    files = sorted((collect_dir / sub).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet parts under {collect_dir / sub}")
    return files


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def read_sorted(files: list[Path], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, ``column``) of worker parts, ordered by token: read-only arrays. The parts are
    concatenated and reordered only when there are several (one part is already in order), so a
    single part's features come back as a view of the decoded Parquet pages, with no copy."""
    tables = [pq.read_table(f, columns=["token", column], memory_map=True) for f in files]
    tok = [column_numpy(t, "token") for t in tables]
    val = [column_numpy(t, column) for t in tables]
    if len(tables) == 1 and (len(tok[0]) < 2 or bool((np.diff(tok[0]) > 0).all())):
        return tok[0], val[0]
    tok_all = np.concatenate(tok)
    order = np.argsort(tok_all, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    out = np.empty((len(order), *val[0].shape[1:]), dtype=val[0].dtype)
    start = 0
    for v in val:  # each part scattered into place: no concatenated copy of the features
        out[rank[start : start + len(v)]] = v
        start += len(v)
    return tok_all[order], out


def read_features(collect_dir: Path, layer: int, block: str = "mlp", kind: str = "hidden") -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n], features [n, I]) of one layer's block, ordered by token."""
    return read_sorted(feature_parts(collect_dir, f"features/L{layer:05d}/{block}"), kind)


def read_inputs(collect_dir: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n], FF inputs x [n, H]) of one layer, ordered by token."""
    return read_sorted(feature_parts(collect_dir, f"inputs/L{layer:05d}"), "x")


def iter_feature_rows(collect_dir: Path, layer: int, block: str, kind: str, rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, features) in row blocks of at most ``rows``: bounded memory for large layers."""
    for f in feature_parts(collect_dir, f"features/L{layer:05d}/{block}"):
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=rows, columns=["token", kind]):
            t = pa.Table.from_batches([batch])
            yield column_numpy(t, "token"), column_numpy(t, kind)


def read_stats(collect_dir: Path, layer: int) -> dict[str, dict[str, np.ndarray]]:
    """{block: {"count", "<kind>.sum", "<kind>.sumsq", "hidden.gram"?}} (float64 sums)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in load_np(str(collect_dir / stats_file(layer))).items():
        block, name = k.split("/", 1)
        out.setdefault(block, {})[name] = v
    return out


def moments(stats: dict[str, np.ndarray], kind: str = "hidden") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, variance, E[f²]) of a block's feature ``kind`` from its sums."""
    n = max(float(stats["count"][0]), 1.0)
    mean = stats[f"{kind}.sum"] / n
    sq = stats[f"{kind}.sumsq"] / n
    return mean, np.maximum(sq - mean * mean, 0.0), sq

