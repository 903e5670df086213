"""collect: what every FF neuron does on real text, per layer (and per expert), to Parquet.

Calibration blocks pass through the model one decoder layer at a time (the layer-streamed
runner). While layer i is resident, the input of its FF block is captured (a pre-hook on the FF
module) and, for MoE layers, the router's own output (logits, top-k weights, top-k experts) — so
the recorded routing *is* the model's. Features are computed from the family-neutral FF weights:

- ``up``: the first FF linear's output before the activation (``up_proj``; ``fc1``/``c_fc``),
- ``gate``: ``gate_proj``'s output before the activation (GLU blocks),
- ``hidden``: the input of the down projection, ``act(gate)*up`` or ``act(up)``.

Layout of a collect artifact (the schema is also in ``meta.json``; every Parquet file's key-value
metadata names its ``mlpfuse.layer``, ``.block``, ``.kinds``, ``.dtype``, ``.tokens`` and
``.worker``, JSON-encoded; columns and list items are non-null)::

    features/L00012/<block>/part-000.parquet   token: int64, [router_weight: float32],
                                               up/gate/hidden: fixed_size_list<float16|float32>[I]
    features/L00012/router/part-000.parquet    token, logits: fsl<float32>[E], experts: fsl<int32>[k],
                                               weights: fsl<float32>[k]
    inputs/L00012/part-000.parquet             token, x: fsl<float32>[H]   (the FF block's input)
    stats/L00012.safetensors                   float64 sums per block and kind (see below)

``<block>`` is ``mlp`` (dense), ``expert<e>`` or ``shared``. ``token`` is the row in the
calibration split (block * block_size + position). Statistics are exact sums, so worker parts
merge by addition: ``<block>/count``, ``<block>/<kind>.sum`` [I], ``<block>/<kind>.sumsq`` [I], and
``<block>/hidden.gram`` = HᵀH [I, I] where I ≤ ``gram_max``; ``layer/cos.sum`` and ``layer/count``: the
sum over tokens of cos(layer input, layer output), for choosing layers to drop.

Data parallel: ``collect_part`` processes every ``num_workers``-th calibration block and commits
each finished layer (its Parquet files, statistics and the carried hidden state) as a part, so a
killed worker resumes at its next unfinished layer; ``collect`` merges the parts (hard links for
Parquet, sums for statistics).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits
from torch import Tensor

from mlpfuse.core.artifacts import commit_part, part_done, write_json_atomic
from mlpfuse.core.errors import NumericalError
from mlpfuse.core.heap import reuse_heap
from mlpfuse.stages.data import read_calib
from mlpfuse.stages.math.ffweights import block_features
from mlpfuse.stages.math.refit import self_product
from mlpfuse.stages.model.families import DenseFF, FamilyAdapter, FFBlockRef
from mlpfuse.stages.model.features import stats_file
from mlpfuse.stages.model.runner import LayerStreamedModel

FeatureKind = Literal["up", "gate", "hidden"]


class CollectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[FeatureKind, ...] = ("up", "gate", "hidden")
    dtype: Literal["float16", "float32"] = "float16"
    # Also store each FF block's input x (needed to refit or re-evaluate a compressed block).
    inputs: bool = True
    num_workers: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    # Full second-moment matrix HᵀH of `hidden` only where the intermediate size is at most this.
    gram_max: int = Field(8192, ge=0)


class CollectPartConfig(CollectConfig):
    worker: int = Field(0, ge=0)


def _write_parquet(table: pa.Table, path: Path) -> None:
    # Activations do not compress and dictionary encoding makes reads ~10x slower: plain pages.
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)


def _dense_spec(family: FamilyAdapter, ref: FFBlockRef) -> DenseFF:
    spec = family.dense if ref.kind == "dense" else (family.moe.shared if family.moe else None)
    if spec is None:
        raise ValueError(f"{family.name}: no dense FF spec for block {ref.name}")
    return spec


def _fsl(arr: np.ndarray) -> pa.FixedSizeListArray:
    """A zero-copy fixed-size-list view of a 2-D array, lists and items declared non-null: Parquet
    then writes no definition levels for them (writes ~1.5x and reads ~2x faster than nullable)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    item = pa.from_numpy_dtype(flat.dtype)
    values = pa.Array.from_buffers(item, flat.size, [None, pa.py_buffer(flat)])
    return pa.FixedSizeListArray.from_arrays(values, type=pa.list_(pa.field("item", item, nullable=False), arr.shape[1]))


def _table(cols: dict[str, np.ndarray], **meta: object) -> pa.Table:
    """Non-null columns, with ``meta`` as the file's key-value metadata (``mlpfuse.<key>``)."""
    arrays = {k: (_fsl(v) if v.ndim == 2 else pa.array(v)) for k, v in cols.items()}
    schema = pa.schema([pa.field(k, a.type, nullable=False) for k, a in arrays.items()],
                       metadata={f"mlpfuse.{k}": json.dumps(v) for k, v in meta.items()})
    return pa.Table.from_arrays(list(arrays.values()), schema=schema)


def _sums(parts: Sequence[Tensor], rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Column sums and sums of squares in float64 of the rows of ``parts`` (each [n, I]: one
    batch's features), a cache-sized row chunk at a time through one float64 scratch buffer (4x
    faster than one float64 copy of the whole matrix)."""
    width = parts[0].shape[1]
    s = torch.zeros(width, dtype=torch.float64)
    sq = torch.zeros(width, dtype=torch.float64)
    scratch = torch.empty(rows, width, dtype=torch.float64)
    for f in parts:
        for a in range(0, f.shape[0], rows):
            c = scratch[: min(rows, f.shape[0] - a)]
            c.copy_(f[a : a + rows])
            s += c.sum(0)
            sq += c.mul_(c).sum(0)
    return s.numpy(), sq.numpy()


class _Stats:
    """Exact float64 sums for one block (sums merge across workers by addition)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, value: np.ndarray) -> None:
        if name in self.arrays:
            self.arrays[name] += value
        else:
            self.arrays[name] = value.astype(np.float64, copy=True)


class _LayerCapture:
    """Hooks on one resident layer, one entry per batch: the FF block's input x, the features of
    dense blocks straight from their own linear modules (no recomputation), and for MoE layers
    the router's output."""

    def __init__(self, layer: torch.nn.Module, family: FamilyAdapter, dense: dict[str, DenseFF], kinds: tuple[str, ...]):
        self.x: list[Tensor] = []
        self.router: list[tuple[Tensor, Tensor, Tensor]] = []
        self.features: dict[str, dict[str, list[Tensor]]] = {b: {k: [] for k in kinds} for b in dense}
        self.handles = [layer.get_submodule(family.ff_module).register_forward_pre_hook(self._pre)]
        for block, spec in dense.items():
            for kind, name, side in (("up", spec.up, "out"), ("gate", spec.gate, "out"), ("hidden", spec.down, "in")):
                if kind in kinds and name is not None:
                    mod = layer.get_submodule(name.format("")[:-1])
                    hook = self._hook(self.features[block][kind], side)
                    self.handles.append(mod.register_forward_hook(hook))
        if family.moe is not None:
            try:
                router = layer.get_submodule(family.moe.router_module)
            except AttributeError:
                router = None  # a dense layer inside an MoE model
            if router is not None:
                self.handles.append(router.register_forward_hook(self._route))

    @staticmethod
    def _hook(store: list[Tensor], side: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            t = args[0] if side == "in" else out
            store.append(t.detach().reshape(-1, t.shape[-1]).float().cpu())

        return hook

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        self.x.append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

    def _route(self, module: torch.nn.Module, args: tuple, out: tuple) -> None:
        logits, weights, experts = out[0], out[1], out[2]
        self.router.append((logits.detach().float().cpu(), weights.detach().float().cpu(), experts.detach().cpu()))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class _Block:
    """One FF block's features in a layer: each kind as its batches' tensors [rows, width]."""

    name: str
    rows: Tensor  # the layer's token rows the block saw
    extra: dict[str, np.ndarray]  # router_weight, for routed experts
    feats: dict[str, list[Tensor]]
    width: int


@dataclass
class _Layer:
    """What a layer's forward leaves for its statistics and tables: no weight of the layer."""

    blocks: list[_Block]
    x: Tensor  # the FF block's input [tokens, hidden]
    router: dict[str, np.ndarray] | None
    cos: np.ndarray  # [sum of cos(layer input, output), tokens]


def _gram(parts: Sequence[Tensor], rows: int = 2048) -> np.ndarray:
    """FᵀF [I, I] in float64 of the rows of ``parts``, from float32 products of row chunks (exact
    enough, far cheaper)."""
    width = parts[0].shape[1]
    g = np.zeros((width, width), dtype=np.float64)
    for f in parts:
        for i in range(0, f.shape[0], rows):
            g += self_product(f[i : i + rows]).numpy()
    return g


def _stack_as(parts: Sequence[Tensor], dtype: torch.dtype) -> np.ndarray:
    """The rows of ``parts`` in one [n, I] array of ``dtype``, each batch cast into its place."""
    out = torch.empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=dtype)
    a = 0
    for p in parts:
        out[a : a + p.shape[0]].copy_(p)
        a += p.shape[0]
    return out.numpy()


def _check_finite(layer: int, block: str, kind: str, parts: Sequence[Tensor]) -> None:
    bad = sum(int((~torch.isfinite(t)).any(dim=-1).sum()) for t in parts)
    if bad:
        total = sum(t.shape[0] for t in parts)
        raise NumericalError(f"non-finite {kind} features in layer {layer}, block {block}: {bad} of {total} tokens")


def run_part(config: CollectPartConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Collect the features of worker ``config.worker``'s share of calibration blocks."""
    if config.worker >= config.num_workers:
        raise ValueError(f"worker={config.worker} must be < num_workers={config.num_workers}")
    model = LayerStreamedModel(inputs["shard"])
    calib = read_calib(inputs["data"])
    mine = np.arange(config.worker, len(calib), config.num_workers)
    block_size = calib.shape[1]
    torch_dtype = torch.float16 if config.dtype == "float16" else torch.float32
    batches = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
    states = [model.start(torch.from_numpy(calib[b])) for b in batches]
    tokens = [torch.from_numpy((b[:, None] * block_size + np.arange(block_size)).reshape(-1)) for b in batches]
    all_tokens = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)

    # Resume: the last layer whose part is committed, and the hidden state carried past it.
    start = 0
    while start < model.num_layers and part_done(out_dir, stats_file(start)):
        start += 1
    carry_file = out_dir / f"carry/L{start - 1:05d}.safetensors"
    if start == model.num_layers:
        pass  # every layer committed (an attempt died before the stage was): nothing left to run
    elif start > 0 and carry_file.exists():
        carry = load_file(str(carry_file))
        for n, s in enumerate(states):
            s.hidden = carry[f"b{n}"].to(device=s.hidden.device, dtype=s.hidden.dtype)
    else:
        start = 0  # no hidden state to continue from: recompute (committed parts are rewritten equal)
    from tqdm import tqdm

    # While layer i+1's forward runs, layer i's statistics, float16 copies and Parquet tables are
    # made on one thread and layer i-1's files are encoded and committed on another (BLAS, Parquet
    # encoding, checksums and fsync release the GIL). Commits run in layer order on their thread, and
    # none follows a layer that failed (a NaN among its features, a full disk), so the committed
    # layers are always a prefix; leaving the block (also on an error) waits for the layers in
    # flight, so what was finished is committed.
    # Every layer allocates and frees the same large buffers (captures, their float16 copies,
    # statistics' chunks): kept on the heap from one layer to the next, not faulted in afresh.
    # NumPy's BLAS (HᵀH) runs on one thread: its idle threads spin on the cores that the forward
    # and the writers need (measured: 6% of collect's CPU samples).
    inflight: deque[Future] = deque()
    failed = threading.Event()
    with reuse_heap(), threadpool_limits(1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect-stats") as maker, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect-write") as writer:
        for i in tqdm(range(start, model.num_layers), desc=f"collect[{config.worker}]", unit="layer",
                      initial=start, total=model.num_layers):
            layer, carry = _run_layer(i, model, states, config)
            while len(inflight) >= 2:  # at most two layers behind the forward
                inflight.popleft().result()
            made = maker.submit(_write_layer, i, layer, all_tokens, config, torch_dtype)
            inflight.append(writer.submit(_commit_made, made, out_dir, i, carry, failed))
        while inflight:
            inflight.popleft().result()
    shutil.rmtree(out_dir / "carry", ignore_errors=True)
    return {"worker": config.worker, "blocks": len(mine), "tokens": int(len(mine) * block_size),
            "layers_resumed_from": start}


def _run_layer(i: int, model: LayerStreamedModel, states: list,
               config: CollectPartConfig) -> tuple[_Layer, dict[str, Tensor]]:
    """Carry every batch through layer i, capturing its features: (what its statistics and tables
    are made of, the hidden state after the layer). The layer's weights are released here."""
    family = model.family
    sd = model.layer_state(i)
    dense = {r.name: _dense_spec(family, r) for r in family.ff_blocks(model.config, sd) if r.kind != "expert"}
    with model.layer(i, sd) as layer:
        cap = _LayerCapture(layer, family, dense, config.features)
        cos = np.zeros(2)  # how little the layer changes the hidden state: sum of cos, tokens
        try:
            for s in states:
                h_in = s.hidden
                s.hidden = model.apply(layer, i, s)
                c = torch.nn.functional.cosine_similarity(h_in.float(), s.hidden.float(), dim=-1)
                cos += (float(c.double().sum()), c.numel())
        finally:
            cap.close()
    blocks, x, router = _layer_blocks(sd, cap, model, config)
    carry = {f"b{n}": s.hidden.detach().cpu().clone() for n, s in enumerate(states)}
    return _Layer(blocks, x, router, cos), carry


def _commit_made(made: Future, out_dir: Path, i: int, carry: dict[str, Tensor], failed: threading.Event) -> None:
    """Commit layer i once its statistics and tables are made, unless an earlier layer failed."""
    if failed.is_set():
        return
    try:
        stats, writes = made.result()
        _commit_layer(out_dir, i, writes, stats, carry)
    except BaseException:
        failed.set()
        raise


def _commit_layer(out_dir: Path, i: int, writes: list[tuple[str, pa.Table]], stats: dict[str, np.ndarray],
                  carry: dict[str, Tensor]) -> None:
    """Commit layer i: its Parquet parts, the hidden state carried past it, then its statistics,
    the layer's completion marker (last)."""
    for rel, table in writes:
        commit_part(out_dir, rel, partial(_write_parquet, table))
    commit_part(out_dir, f"carry/L{i:05d}.safetensors", lambda p: save_file(carry, str(p)))
    commit_part(out_dir, stats_file(i), lambda p: save_np(stats, str(p)))
    if i > 0:  # only the latest carry is ever needed
        (out_dir / f"carry/L{i - 1:05d}.safetensors").unlink(missing_ok=True)


def _layer_blocks(sd: dict[str, Tensor], cap: _LayerCapture, model: LayerStreamedModel,
                  config: CollectPartConfig) -> tuple[list[_Block], Tensor, dict[str, np.ndarray] | None]:
    """Every FF block's features: dense blocks' as captured from their own modules (not
    concatenated: the float16 copy is the one copy made), routed experts' computed from the layer's
    weights; the FF input x; the router's table (MoE layers)."""
    family, hf_config = model.family, model.config
    x = torch.cat(cap.x) if cap.x else torch.zeros(0, hf_config.hidden_size)
    refs = family.ff_blocks(hf_config, sd)
    router = None
    if any(r.kind == "expert" for r in refs):
        logits = torch.cat([r[0] for r in cap.router])
        weights = torch.cat([r[1] for r in cap.router])
        experts = torch.cat([r[2] for r in cap.router])
        router = {"logits": logits.numpy(), "experts": experts.int().numpy(), "weights": weights.numpy()}
    blocks = []
    for ref in refs:
        ff = family.read_ff(hf_config, sd, ref)
        if ref.kind == "expert":
            hit = torch.as_tensor(experts == ref.expert)
            rows = hit.any(dim=-1).nonzero().squeeze(-1)
            extra = {"router_weight": (weights * hit).sum(-1)[rows].numpy()}
        else:
            rows = torch.arange(x.shape[0])
            extra = {}
        if ref.name in cap.features:
            feats = {k: v for k, v in cap.features[ref.name].items() if v}
        else:
            feats = {k: [v] for k, v in block_features(ff, x[rows], config.features).items()}
        blocks.append(_Block(ref.name, rows, extra, feats, ff.intermediate_size))
    return blocks, x, router


def _write_layer(i: int, layer: _Layer, all_tokens: Tensor, config: CollectPartConfig,
                 torch_dtype: torch.dtype) -> tuple[dict[str, np.ndarray], list[tuple[str, pa.Table]]]:
    """Layer i's statistics and its Parquet tables, as (relative path, table) to commit."""
    writes: list[tuple[str, pa.Table]] = []
    stats: dict[str, _Stats] = {}
    tables: dict[str, dict[str, np.ndarray]] = {}
    if layer.router is not None:
        tables["router"] = {"token": all_tokens.numpy(), **layer.router}
    for block in layer.blocks:
        st = stats.setdefault(block.name, _Stats())
        st.add("count", np.array([len(block.rows)], dtype=np.float64))
        for kind, f in block.feats.items():
            total, sumsq = _sums(f)
            # A float64 sum of float32 values is finite iff every value is: no separate pass.
            if not (np.isfinite(total).all() and np.isfinite(sumsq).all()):
                _check_finite(i, block.name, kind, f)
            st.add(f"{kind}.sum", total)
            st.add(f"{kind}.sumsq", sumsq)
            if kind == "hidden" and block.width <= config.gram_max:
                st.add("hidden.gram", _gram(f))
        tables[block.name] = {"token": all_tokens[block.rows].numpy(), **block.extra,
                              **{k: _stack_as(v, torch_dtype) for k, v in block.feats.items()}}
    for name, cols in tables.items():
        kinds = [k for k in cols if k not in ("token", "router_weight")]
        table = _table(cols, layer=i, block=name, kinds=kinds, tokens=len(cols["token"]), worker=config.worker,
                       dtype="float32" if name == "router" else config.dtype)
        writes.append((f"features/L{i:05d}/{name}/part-{config.worker:03d}.parquet", table))
    if config.inputs:
        x = layer.x
        table = _table({"token": all_tokens.numpy(), "x": x.numpy()}, layer=i, block="input", kinds=["x"],
                       tokens=x.shape[0], worker=config.worker, dtype="float32")
        writes.append((f"inputs/L{i:05d}/part-{config.worker:03d}.parquet", table))
    stats_out = {f"{b}/{k}": v for b, st in stats.items() for k, v in st.arrays.items()}
    stats_out["layer/cos.sum"], stats_out["layer/count"] = layer.cos[:1].copy(), layer.cos[1:].copy()
    return stats_out, writes


def run_merge(config: CollectConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Merge worker parts: Parquet files hard-linked (copied across filesystems), sums added (a
    single part's statistics are its totals: linked too)."""
    parts = [inputs[k] for k in sorted(inputs) if k.startswith("part")]
    if len(parts) != config.num_workers:
        raise ValueError(f"expected {config.num_workers} parts, got {len(parts)}")
    model_meta = json.loads((inputs["shard"] / "shard.json").read_text())
    n_layers = model_meta["num_layers"]
    tokens = 0
    for part in parts:
        for f in list(part.rglob("*.parquet")):
            _link(f, out_dir / f.relative_to(part))
    blocks: dict[int, list[str]] = {}
    for i in range(n_layers):
        dest = out_dir / stats_file(i)
        if len(parts) == 1:
            _link(parts[0] / stats_file(i), dest)
            with safe_open(str(dest), "np") as f:
                names = list(f.keys())
                total = {k: f.get_tensor(k) for k in names if k.endswith("/count")}
        else:
            total = {}
            for part in parts:
                for k, v in load_np(str(part / stats_file(i))).items():
                    total[k] = total[k] + v if k in total else v
            names = list(total)
            dest.parent.mkdir(exist_ok=True)
            save_np(total, str(dest))
        blocks[i] = sorted({k.split("/")[0] for k in names} - {"layer"})
        # Tokens through the layer: the layer's own count (dense blocks, shared experts and the
        # routed experts' sums count the same tokens again).
        tokens = max(tokens, int(total["layer/count"][0]) if "layer/count" in total else
                     int(sum(v[0] for k, v in total.items() if k.endswith("/count") and "expert" not in k)))
    meta = {
        "num_layers": n_layers, "tokens": tokens, "features": list(config.features), "dtype": config.dtype,
        "inputs": config.inputs, "workers": config.num_workers, "blocks": {str(i): b for i, b in blocks.items()},
        "schema": {
            "features/L<layer>/<block>/part-<w>.parquet": "token int64, [router_weight float32], "
            "<kind> fixed_size_list<dtype>[intermediate]",
            "features/L<layer>/router/part-<w>.parquet": "token, logits fsl<float32>[E], experts fsl<int32>[k], "
            "weights fsl<float32>[k]",
            "inputs/L<layer>/part-<w>.parquet": "token int64, x fixed_size_list<float32>[hidden]",
            "stats/L<layer>.safetensors": "<block>/count, <block>/<kind>.sum, <block>/<kind>.sumsq, "
            "<block>/hidden.gram (float64)",
        },
    }
    write_json_atomic(out_dir / "meta.json", meta)
    return {"tokens": tokens, "layers": n_layers, "workers": config.num_workers}


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)


