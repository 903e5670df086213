"""similarity: linear CKA between every pair of FF sublayers, from collect's calibration data.

As in Merging Feed-Forward Sublayers for Compressed Transformers (2025, section 5.5 and figure 5):
the similarity of two FF sublayers is the linear CKA (Kornblith et al., 2019) of their *outputs*
on the same calibration tokens, i.e. of what each adds to the residual stream, isolated from the
stream itself. The [L, L] matrix is written to ``similarity.json``; the report puts it at
``report["similarity"]`` and draws it as ``similarity.png``.

Features (``SimilarityConfig.feature``):

- ``output`` (default): each layer's FF output recomputed from collect's recorded FF inputs
  ``x`` and the layer's weights in the shard. Dense blocks use the family-neutral
  :meth:`FFWeights.forward` (bias included); MoE layers run the layer's own FF module on ``x``,
  so the output is exactly the model's: routed experts weighted by the router, plus the shared
  expert (with its gate where the family has one). Needs a collect run with ``inputs=True``.
  Invariant to permuting a layer's FF neurons (the output is unchanged).
- ``hidden``: collect's recorded input of the down projection [n, I]. Dense layers only (an MoE
  layer's experts see different tokens, so it has no single hidden representation).

Tokens: with ``skip_positions: N`` the first N positions of every calibration block are left out
(the attention-sink position; token ids are ``block · length + position``). ``tokens`` calibration
rows are then drawn once, uniformly without replacement with ``seed``
(:func:`subsample_tokens`), and the same rows are used for every layer; all rows when there are
fewer. Rows are read in blocks of ``rows`` (only the chosen ones are kept), so memory does not
grow with the calibration set.

Computation (sample-Gram form, as :mod:`mlpfuse.stages.math.cka`): for each layer the
centred Gram ``K = Yc Ycᵀ`` [n, n] is built in float64 and divided by its Frobenius norm, then
CKA(i, j) = ``<K_i, K_j>_F``. One layer's features are resident at a time; the L normalised Grams
are kept in float32 (``4·L·n²`` bytes: 0.5 GB for 30 layers at n = 2048) and their inner
products are summed in float64. A constant layer (zero Gram) gets 0 everywhere, its diagonal
included, as in :func:`mlpfuse.stages.math.cka.cka`.

``similarity.json``: ``{"matrix": [[...]] (L×L), "layers": [0..L-1], "feature", "tokens": n,
"measure": "linear CKA", "seed"}``. The stage's result (kept in the manifest) holds summary
figures and the matrix itself only when L <= ``MATRIX_IN_RESULT_MAX`` (32 layers, ~1k numbers);
consumers should read the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.core.artifacts import write_json_atomic
from mlpfuse.core.errors import InputError
from mlpfuse.stages.data import read_calib
from mlpfuse.stages.math.cka import gram_products, normalized_gram
from mlpfuse.stages.model.features import column_numpy, feature_parts
from mlpfuse.stages.model.runner import LayerStreamedModel

MEASURE = "linear CKA"
#: The stage's result carries the matrix only up to this many layers (the file always has it).
MATRIX_IN_RESULT_MAX = 32
# Gram inner products are summed over chunks of this many float32 entries (cast to float64).


class SimilarityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    feature: Literal["output", "hidden"] = "output"
    # Calibration tokens compared (a seeded uniform subsample; all of them when there are fewer).
    tokens: int = Field(2048, ge=2)
    seed: int = 0
    # Rows read (and FF outputs computed) per block.
    rows: int = Field(4096, ge=1)
    # Leave out the first N positions of every calibration block (needs the data stage's output).
    # In models with an attention sink the first position carries a large share of some layers'
    # FF output energy (a quarter to a half in three of SmolLM2's layers) and dominates their CKA;
    # 1 compares the layers on the rest of the text.
    skip_positions: int = Field(0, ge=0)


def subsample_tokens(token_ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``token_ids`` (sorted, int64), drawn uniformly without replacement with ``seed``;
    all of them when there are at most ``n``."""
    ids = np.unique(np.asarray(token_ids, dtype=np.int64))
    if len(ids) <= n:
        return ids
    pick = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return np.sort(ids[pick])


def _read_rows(collect_dir: Path, sub: str, column: str, chosen: np.ndarray, rows: int) -> np.ndarray:
    """Column ``column`` of the Parquet parts under ``sub`` at the tokens ``chosen`` (sorted),
    read in blocks of ``rows`` keeping only the chosen rows: [len(chosen), d], in token order."""
    toks, vals = [], []
    for f in feature_parts(collect_dir, sub):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=["token", column]):
            t = pa.Table.from_batches([batch])
            tok = column_numpy(t, "token").astype(np.int64)
            pos = np.searchsorted(chosen, tok).clip(0, len(chosen) - 1)
            keep = chosen[pos] == tok
            if keep.any():
                toks.append(tok[keep])
                vals.append(column_numpy(t, column)[keep])
    tok = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
    order = np.argsort(tok, kind="stable")
    if not np.array_equal(tok[order], chosen):
        raise InputError(f"{collect_dir / sub}: does not hold exactly one row for each chosen calibration token "
                         f"({len(np.unique(tok))} of {len(chosen)} found)")
    return np.concatenate(vals)[order]


def _token_ids(collect_dir: Path, sub: str) -> np.ndarray:
    return np.concatenate([column_numpy(pq.read_table(f, columns=["token"]), "token") for f in feature_parts(collect_dir, sub)])


@torch.no_grad()
def _ff_output(model: LayerStreamedModel, i: int, x: np.ndarray, rows: int) -> Tensor:
    """Layer ``i``'s FF sublayer output [n, H] (float32) for FF inputs ``x`` [n, H]."""
    family, cfg = model.family, model.config
    sd = model.layer_state(i)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if family.is_moe_layer(cfg, sd):
        # The layer's own MoE block: routing, expert weights and the shared expert's gate as the model has them.
        with model.layer(i, sd) as layer:
            mod = layer.get_submodule(family.ff_module)
            outs = []
            for s in range(0, len(xt), rows):
                y = mod(xt[None, s : s + rows])
                y = y[0] if isinstance(y, tuple) else y
                outs.append(y.reshape(-1, y.shape[-1]).float())
        return torch.cat(outs)
    refs = family.ff_blocks(cfg, sd)
    if len(refs) != 1:
        raise InputError(f"layer {i}: expected one dense FF block, got {[r.name for r in refs]}")
    ff = family.read_ff(cfg, sd, refs[0]).to(torch.float32)
    return torch.cat([ff.forward(xt[s : s + rows]) for s in range(0, len(xt), rows)])


def run(config: SimilarityConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` (FF weights, for ``output``), ``collect`` (FF inputs / features) and,
    for ``skip_positions``, ``data`` (the calibration blocks' length)."""
    collect_dir = inputs["collect"]
    meta = json.loads((collect_dir / "meta.json").read_text())
    n_layers = int(meta["num_layers"])
    model = LayerStreamedModel(inputs["shard"]) if config.feature == "output" else None
    if model is not None and model.num_layers != n_layers:
        raise InputError(f"shard has {model.num_layers} layers, collect {n_layers}: not the same model")
    if config.feature == "output" and not meta.get("inputs", False):
        raise InputError("feature='output' needs the FF inputs: run collect with inputs=True, or use feature='hidden'")
    if config.feature == "hidden":
        if "hidden" not in meta.get("features", []):
            raise InputError("feature='hidden' needs collect's 'hidden' features")
        moe = [i for i in range(n_layers) if meta["blocks"][str(i)] != ["mlp"]]
        if moe:
            raise InputError(f"feature='hidden' compares dense FF layers only; layers {moe} are MoE "
                             "(their experts see different tokens): use feature='output'")

    def sub(i: int) -> str:
        return f"inputs/L{i:05d}" if config.feature == "output" else f"features/L{i:05d}/mlp"

    ids = _token_ids(collect_dir, sub(0))
    if config.skip_positions:
        if "data" not in inputs:
            raise InputError("similarity.skip_positions needs the calibration blocks' length: add the data stage's output")
        block = int(read_calib(inputs["data"]).shape[1])
        if config.skip_positions >= block:
            raise InputError(f"similarity.skip_positions={config.skip_positions} leaves nothing of blocks of {block} tokens")
        ids = ids[np.asarray(ids, dtype=np.int64) % block >= config.skip_positions]  # token id = block * length + position
    chosen = subsample_tokens(ids, config.tokens, config.seed)
    n = len(chosen)
    if n < 2:
        raise InputError(f"CKA needs at least 2 calibration tokens, collect has {n}")
    grams = torch.zeros(n_layers, n * n, dtype=torch.float32)
    live = np.zeros(n_layers, dtype=bool)
    for i in range(n_layers):
        if config.feature == "output":
            assert model is not None
            f: np.ndarray | Tensor = _ff_output(model, i, _read_rows(collect_dir, sub(i), "x", chosen, config.rows),
                                                config.rows)
        else:
            f = _read_rows(collect_dir, sub(i), "hidden", chosen, config.rows)
        g, live[i] = normalized_gram(f)
        grams[i] = g.reshape(-1).float()
        del f, g
    m = gram_products(grams)
    del grams
    np.fill_diagonal(m, live.astype(np.float64))  # <K, K> of a normalised Gram is 1 up to float32 rounding
    m = ((m + m.T) / 2).clip(0.0, 1.0)  # linear CKA of PSD Grams is in [0, 1]
    matrix = [[round(float(v), 6) for v in row] for row in m]
    doc = {"matrix": matrix, "layers": list(range(n_layers)), "feature": config.feature, "tokens": n,
           "measure": MEASURE, "seed": config.seed, "skip_positions": config.skip_positions}
    write_json_atomic(out_dir / "similarity.json", doc)
    adjacent = np.diagonal(m, 1)
    result: dict = {"layers": n_layers, "tokens": n, "feature": config.feature, "measure": MEASURE,
                    "skip_positions": config.skip_positions}
    if n_layers > 1:
        result["adjacent"] = {"min": round(float(adjacent.min()), 4), "mean": round(float(adjacent.mean()), 4),
                              "max": round(float(adjacent.max()), 4)}
    if n_layers <= MATRIX_IN_RESULT_MAX:
        result["matrix"] = matrix
    return result
