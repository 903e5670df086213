"""similarity: the per-layer linear-CKA matrix of FF sublayers equals a direct numpy computation on
the model's own FF outputs (dense and MoE), is a proper similarity matrix, and does not change when
a layer's FF neurons are permuted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.pipeline import Session
from mlpfuse.orchestrator.report import build_report
from mlpfuse.orchestrator.spec import parse_spec
from mlpfuse.orchestrator.store import ArtifactStore
from mlpfuse.stages import collect, shard, similarity
from mlpfuse.stages.collect import CollectConfig, CollectPartConfig
from mlpfuse.stages.math.cka import cka
from mlpfuse.stages.model.features import read_features
from mlpfuse.stages.similarity import SimilarityConfig, subsample_tokens

N_BLOCKS, BLOCK = 6, 8  # 48 calibration tokens


def _calib(tmp: Path, vocab: int = 128) -> tuple[Path, np.ndarray]:
    d = tmp / "data"
    d.mkdir()
    ids = np.random.default_rng(0).integers(0, vocab, size=(N_BLOCKS, BLOCK)).astype(np.int32)
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), BLOCK)}),
                   d / "calib.parquet")
    return d, ids


def _artifacts(checkpoint: Path, tmp: Path) -> tuple[Path, Path, np.ndarray]:
    """(shard, collect, calibration ids [blocks, T]) of a tiny checkpoint."""
    sh = tmp / "shard"
    shard.run(shard.ShardConfig(model=str(checkpoint)), {}, sh)
    data, ids = _calib(tmp)
    collect.run_part(CollectPartConfig(batch_size=2, dtype="float32"), {"shard": sh, "data": data}, tmp / "p0")
    collect.run_merge(CollectConfig(dtype="float32"), {"shard": sh, "part0": tmp / "p0"}, tmp / "c")
    return sh, tmp / "c", ids


def _hf_ff_outputs(checkpoint: Path, ids: np.ndarray) -> list[np.ndarray]:
    """Every layer's FF (``mlp``) output [tokens, H] in the plain transformers model, token order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    outs: list[np.ndarray] = []
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda m, a, o: outs.append(o.reshape(-1, o.shape[-1]).double().numpy()))
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)), use_cache=False)
    return outs


def _np_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in the feature-Gram form (the stage uses the sample-Gram form)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def _run(sh: Path, c: Path, out: Path, **kw: object) -> tuple[dict, dict]:
    result = similarity.run(SimilarityConfig(**kw), {"shard": sh, "collect": c}, out)
    return result, json.loads((out / "similarity.json").read_text())


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    return _artifacts(tiny_checkpoints["llama"], tmp_path_factory.mktemp("sim-llama"))


def _check_matrix(m: np.ndarray, layers: int) -> None:
    assert m.shape == (layers, layers)
    np.testing.assert_array_equal(np.diagonal(m), 1.0)
    np.testing.assert_array_equal(m, m.T)
    assert (m >= 0).all() and (m <= 1).all()


def test_dense_output_matrix_equals_numpy_on_the_models_outputs(llama, tiny_checkpoints, tmp_path: Path) -> None:
    sh, c, ids = llama
    result, doc = _run(sh, c, tmp_path, tokens=32, seed=3, rows=5)  # a subsample, read in odd-sized blocks
    assert doc["feature"] == "output" and doc["measure"] == "linear CKA" and doc["layers"] == [0, 1, 2]
    assert doc["tokens"] == result["tokens"] == 32 and result["matrix"] == doc["matrix"]
    m = np.asarray(doc["matrix"])
    _check_matrix(m, 3)
    chosen = subsample_tokens(np.arange(N_BLOCKS * BLOCK), 32, 3)
    ys = [y[chosen] for y in _hf_ff_outputs(tiny_checkpoints["llama"], ids)]
    ref = np.array([[_np_cka(a, b) for b in ys] for a in ys])
    np.testing.assert_allclose(m, ref, atol=2e-6)
    np.testing.assert_allclose(m, [[cka(a, b) for b in ys] for a in ys], atol=2e-6)
    assert not np.allclose(m, np.eye(3), atol=1e-3)  # random layers are related, not orthogonal


def test_hidden_feature_equals_numpy_cka_of_collected_features(llama, tmp_path: Path) -> None:
    sh, c, _ = llama
    _, doc = _run(sh, c, tmp_path, feature="hidden", tokens=1000)  # more than there are: all 48
    assert doc["tokens"] == N_BLOCKS * BLOCK
    m = np.asarray(doc["matrix"])
    _check_matrix(m, 3)
    hs = [read_features(c, i, "mlp", "hidden")[1].astype(np.float64) for i in range(3)]
    np.testing.assert_allclose(m, [[_np_cka(a, b) for b in hs] for a in hs], atol=2e-6)


def test_permuting_a_layers_neurons_leaves_the_matrix_unchanged(llama, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mlpfuse.stages.model.shards import layer_file

    sh, c, _ = llama
    _, before = _run(sh, c, tmp_path / "a", tokens=40)
    perm_shard = tmp_path / "shard"
    shutil.copytree(sh, perm_shard)
    sd = load_file(str(perm_shard / layer_file(1)))
    p = torch.randperm(sd["mlp.up_proj.weight"].shape[0], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(p, torch.arange(len(p)))
    for k in ("mlp.up_proj.weight", "mlp.gate_proj.weight"):
        sd[k] = sd[k][p].contiguous()
    sd["mlp.down_proj.weight"] = sd["mlp.down_proj.weight"][:, p].contiguous()
    save_file(sd, str(perm_shard / layer_file(1)))
    _, after = _run(perm_shard, c, tmp_path / "b", tokens=40)
    np.testing.assert_allclose(after["matrix"], before["matrix"], atol=1e-6)


def test_moe_output_is_the_moe_blocks_output(tiny_checkpoints, tmp_path: Path) -> None:
    """qwen2_moe: routed experts weighted by the router plus the gated shared expert."""
    sh, c, ids = _artifacts(tiny_checkpoints["qwen2_moe"], tmp_path)
    _, doc = _run(sh, c, tmp_path / "s")
    m = np.asarray(doc["matrix"])
    _check_matrix(m, 2)
    ys = _hf_ff_outputs(tiny_checkpoints["qwen2_moe"], ids)
    np.testing.assert_allclose(m, [[_np_cka(a, b) for b in ys] for a in ys], atol=2e-6)
    with pytest.raises(InputError, match="MoE"):
        similarity.run(SimilarityConfig(feature="hidden"), {"shard": sh, "collect": c}, tmp_path / "h")


def test_report_carries_the_matrix(llama, tmp_path: Path) -> None:
    sh, c, _ = llama
    _run(sh, c, tmp_path / "sim", tokens=16)
    spec = parse_spec({"model": "x", "output": str(tmp_path / "out")})
    store = ArtifactStore(tmp_path / "cache")
    session = Session(spec, store)
    res = {"shard": {"result": {"params": 1, "ff_params": 1}}, "evaluate": {"result": {"perplexity": 2.0, "tokens": 3}}}
    session.results = {k: {**v, "stage": k, "key": k, "status": "hit", "seconds": 0.0} for k, v in res.items()}
    assert "similarity" not in build_report(spec, session, 0.0)
    staging = store.staging_dir("similarity", "k")
    shutil.copytree(tmp_path / "sim", staging)
    store.commit("similarity", "k", staging, {"result": {}})
    session.results["similarity"] = {"stage": "similarity", "key": "k", "status": "run", "seconds": 0.0, "result": {}}
    report = build_report(spec, session, 0.0)
    assert np.asarray(report["similarity"]["matrix"]).shape == (3, 3) and report["similarity"]["tokens"] == 16
    assert report["stages"]["similarity"]["path"] == str(store.artifact_dir("similarity", "k"))


def test_skip_positions_leaves_out_the_first_positions_of_every_block(llama, tiny_checkpoints, tmp_path: Path) -> None:
    """``skip_positions: 1`` compares the layers on every position but each block's first (the
    attention-sink token): numpy CKA of transformers' own FF outputs on exactly those rows."""
    sh, c, ids = llama
    data = tmp_path / "data-ref"
    data.mkdir()
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), BLOCK)}),
                   data / "calib.parquet")
    result = similarity.run(SimilarityConfig(skip_positions=1, tokens=1000), {"shard": sh, "collect": c, "data": data},
                            tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert doc["tokens"] == result["tokens"] == N_BLOCKS * (BLOCK - 1) and doc["skip_positions"] == 1
    keep = np.arange(N_BLOCKS * BLOCK) % BLOCK != 0
    ys = [y[keep] for y in _hf_ff_outputs(tiny_checkpoints["llama"], ids)]
    np.testing.assert_allclose(np.asarray(doc["matrix"]), [[_np_cka(a, b) for b in ys] for a in ys], atol=2e-6)
    with pytest.raises(InputError, match="data stage"):
        similarity.run(SimilarityConfig(skip_positions=1), {"shard": sh, "collect": c}, tmp_path / "o2")
    with pytest.raises(InputError, match="leaves nothing"):
        similarity.run(SimilarityConfig(skip_positions=BLOCK), {"shard": sh, "collect": c, "data": data}, tmp_path / "o3")
