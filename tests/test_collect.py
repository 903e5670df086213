"""collect: exact statistics across workers, MoE routing recorded as the model routes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mlpfuse.stages import collect, shard
from mlpfuse.stages.collect import CollectConfig, CollectPartConfig
from mlpfuse.stages.model.features import read_features, read_stats


def _data(tmp: Path, n_blocks: int, block: int, vocab: int, seed: int = 0) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    ids = np.random.default_rng(seed).integers(0, vocab, size=(n_blocks, block)).astype(np.int32)
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), block)}),
                   d / "calib.parquet")
    return d


def _collect(shard_dir: Path, data: Path, out: Path, workers: int, **kw: object) -> Path:
    parts = {}
    for w in range(workers):
        cfg = CollectPartConfig(worker=w, num_workers=workers, batch_size=2, dtype="float32", **kw)
        collect.run_part(cfg, {"shard": shard_dir, "data": data}, out / f"p{w}")
        parts[f"part{w}"] = out / f"p{w}"
    collect.run_merge(CollectConfig(num_workers=workers, dtype="float32", **kw), {"shard": shard_dir, **parts}, out / "m")
    return out / "m"


@pytest.fixture(scope="module")
def llama_shard(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama") / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, out)
    return out


def test_two_workers_equal_one_and_numpy(llama_shard: Path, tmp_path: Path) -> None:
    data = _data(tmp_path, n_blocks=7, block=8, vocab=128)
    one = _collect(llama_shard, data, tmp_path / "one", workers=1)
    two = _collect(llama_shard, data, tmp_path / "two", workers=2)
    for merged in (one, two):  # the merged token count is the calibration tokens, counted once
        assert json.loads((merged / "meta.json").read_text())["tokens"] == 7 * 8
    for layer in range(3):
        s1, s2 = read_stats(one, layer)["mlp"], read_stats(two, layer)["mlp"]
        assert s1.keys() == s2.keys()
        for k in s1:  # the gram is summed from float32 chunk products: float32 rounding
            tol = 1e-5 if k == "hidden.gram" else 1e-9
            np.testing.assert_allclose(s1[k], s2[k], rtol=tol, atol=1e-9)
        for kind in ("up", "gate", "hidden"):
            tok, f = read_features(two, layer, "mlp", kind)
            assert np.array_equal(tok, np.arange(7 * 8))
            f64 = f.astype(np.float64)
            np.testing.assert_allclose(s2[f"{kind}.sum"], f64.sum(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(s2[f"{kind}.sumsq"], (f64 * f64).sum(0), rtol=1e-9, atol=1e-9)
        _, h = read_features(one, layer, "mlp", "hidden")
        np.testing.assert_allclose(s1["hidden.gram"], h.astype(np.float64).T @ h, rtol=1e-5, atol=1e-6)


def test_parquet_reads_the_same_in_pyarrow_pandas_and_datasets(llama_shard: Path, tmp_path: Path) -> None:
    import datasets

    data = _data(tmp_path, n_blocks=5, block=8, vocab=128)
    two = _collect(llama_shard, data, tmp_path / "two", workers=2)
    tok, feats = read_features(two, 1, "mlp", "hidden")
    part = two / "features/L00001/mlp/part-001.parquet"
    schema = pq.read_schema(part)
    meta = {k.decode(): json.loads(v) for k, v in schema.metadata.items() if k.startswith(b"mlpfuse.")}
    assert meta == {"mlpfuse.layer": 1, "mlpfuse.block": "mlp", "mlpfuse.kinds": ["up", "gate", "hidden"],
                    "mlpfuse.dtype": "float32", "mlpfuse.tokens": 2 * 8, "mlpfuse.worker": 1}
    assert pa.types.is_fixed_size_list(schema.field("hidden").type) and not schema.field("hidden").nullable
    frame = pq.read_table(part).to_pandas()
    ds = datasets.Dataset.from_parquet(str(part), cache_dir=str(tmp_path / "hf"))
    rows = np.searchsorted(tok, frame["token"].to_numpy())
    np.testing.assert_array_equal(np.stack(frame["hidden"].to_numpy()), feats[rows])
    np.testing.assert_array_equal(np.asarray(ds.with_format("numpy")["hidden"]), feats[rows])
    # worker 1 holds blocks 1 and 3: the merged read puts every token back in order
    assert frame["token"].tolist() == [*range(8, 16), *range(24, 32)]
    assert tok.tolist() == list(range(5 * 8))


def test_features_are_the_models_own(llama_shard: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Recorded hidden features equal the input of down_proj in the in-memory model."""
    from transformers import AutoModelForCausalLM

    data = _data(tmp_path, n_blocks=2, block=8, vocab=128)
    out = _collect(llama_shard, data, tmp_path / "c", workers=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).eval()
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    ids = torch.from_numpy(pq.read_table(data / "calib.parquet").column(0).combine_chunks().values.to_numpy()
                           .reshape(2, 8).astype(np.int64))
    with torch.no_grad():
        model(ids, use_cache=False)
    _, h = read_features(out, 1, "mlp", "hidden")
    np.testing.assert_allclose(h, seen[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_routing_recorded_exactly(model_type: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[model_type])), {}, out)
    data = _data(tmp_path, n_blocks=3, block=8, vocab=128)
    c = _collect(out, data, tmp_path / "c", workers=2)
    assert json.loads((c / "meta.json").read_text())["tokens"] == 3 * 8
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[model_type]).eval()
    routed = []
    model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, o: routed.append(o[2]))
    ids = torch.from_numpy(pq.read_table(data / "calib.parquet").column(0).combine_chunks().values.to_numpy()
                           .reshape(3, 8).astype(np.int64))
    with torch.no_grad():
        model(ids, use_cache=False)
    experts_ref = routed[0].numpy()  # [tokens, k], tokens in calibration order
    tables = [pq.read_table(f) for f in sorted((c / "features/L00001/router").glob("*.parquet"))]
    tok = np.concatenate([t.column("token").to_numpy() for t in tables])
    exp = np.concatenate([t.column("experts").combine_chunks().values.to_numpy().reshape(len(t), -1) for t in tables])
    order = np.argsort(tok)
    assert np.array_equal(tok[order], np.arange(24))
    assert np.array_equal(np.sort(exp[order], 1), np.sort(experts_ref, 1))
    n_experts = 4
    for e in range(n_experts):
        etok, _ = read_features(c, 1, f"expert{e}", "hidden")
        expected = np.nonzero((experts_ref == e).any(1))[0]
        assert np.array_equal(etok, expected)  # each routed token exactly once
    blocks = read_stats(c, 1)
    assert sum(blocks[f"expert{e}"]["count"][0] for e in range(n_experts)) == 24 * 2
    if model_type == "qwen2_moe":
        stok, _ = read_features(c, 1, "shared", "hidden")
        assert np.array_equal(stok, np.arange(24))


def test_bfloat16_expert_features_are_computed_in_float32(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A bfloat16 MoE checkpoint: each expert's recorded features are the float32 computation the
    model's forward does (upcast weights), not a bfloat16 one."""
    from transformers import AutoModelForCausalLM

    from mlpfuse.stages.model.features import read_inputs

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints["mixtral"], dtype=torch.bfloat16).save_pretrained(bf16)
    out = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(bf16)), {}, out)
    c = _collect(out, _data(tmp_path, n_blocks=3, block=8, vocab=128), tmp_path / "c", workers=1)
    experts = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).model.layers[1].mlp.experts
    tok, x = read_inputs(c, 1)
    for e in range(4):
        etok, h = read_features(c, 1, f"expert{e}", "hidden")
        gate, up = torch.nn.functional.linear(torch.tensor(x[np.searchsorted(tok, etok)]),
                                              experts.gate_up_proj[e].detach()).chunk(2, dim=-1)
        np.testing.assert_allclose(h, (torch.nn.functional.silu(gate) * up).numpy(), rtol=1e-5, atol=1e-6)


def test_killed_collect_resumes(llama_shard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(tmp_path, n_blocks=4, block=8, vocab=128)
    cfg = CollectPartConfig(worker=0, num_workers=1, batch_size=2, dtype="float32")
    real = collect._write_layer

    def crash_at_1(i: int, *a: object, **k: object) -> object:
        if i == 1:
            raise RuntimeError("worker killed")
        return real(i, *a, **k)

    monkeypatch.setattr(collect, "_write_layer", crash_at_1)
    with pytest.raises(RuntimeError):
        collect.run_part(cfg, {"shard": llama_shard, "data": data}, tmp_path / "p")
    monkeypatch.setattr(collect, "_write_layer", real)
    # The committed layers are a prefix: the layer after the failed one (through its forward while
    # layer 1's statistics were made) was not committed either.
    from mlpfuse.core.artifacts import part_done

    assert [part_done(tmp_path / "p", f"stats/L{i:05d}.safetensors") for i in range(3)] == [True, False, False]
    done = {f: f.stat().st_mtime_ns for f in (tmp_path / "p").rglob("*.parquet")}
    result = collect.run_part(cfg, {"shard": llama_shard, "data": data}, tmp_path / "p")
    assert result["layers_resumed_from"] == 1
    assert all(f.stat().st_mtime_ns == t for f, t in done.items())  # finished layers not rewritten
    fresh = _collect(llama_shard, data, tmp_path / "fresh", workers=1)
    collect.run_merge(CollectConfig(num_workers=1, dtype="float32"), {"shard": llama_shard, "part0": tmp_path / "p"},
                      tmp_path / "m")
    for layer in range(3):
        _, a = read_features(tmp_path / "m", layer, "mlp", "hidden")
        _, b = read_features(fresh, layer, "mlp", "hidden")
        assert np.array_equal(a, b)


def test_nan_features_name_the_layer(llama_shard: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from mlpfuse.core.errors import NumericalError
    from mlpfuse.stages.model.shards import layer_file

    bad = tmp_path / "shard"
    import shutil

    shutil.copytree(llama_shard, bad)
    sd = load_file(str(bad / layer_file(1)))
    sd["mlp.up_proj.weight"][3, :] = float("inf")
    save_file(sd, str(bad / layer_file(1)))
    data = _data(tmp_path, n_blocks=2, block=8, vocab=128)
    with pytest.raises(NumericalError, match=r"layer 1, block mlp: \d+ of 16 tokens"):
        collect.run_part(CollectPartConfig(dtype="float32"), {"shard": bad, "data": data}, tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p" / "stats").iterdir()) == ["L00000.safetensors"]


def test_stage_tasks_run_with_passive_openmp_waiting(tmp_path: Path) -> None:
    """collect's writer thread shares the cores with torch's OpenMP pool: every task process of a
    run (the embedded Ray, and jobs submitted to a cluster) gets OMP_WAIT_POLICY=PASSIVE."""
    import subprocess
    import sys

    from mlpfuse.cluster.runtime_env import TASK_ENV, runtime_env

    root = Path(__file__).resolve().parents[1]
    assert TASK_ENV["OMP_WAIT_POLICY"] == "PASSIVE"
    assert TASK_ENV.items() <= runtime_env(root)["env_vars"].items()
    code = (
        "import os, ray\n"
        "from mlpfuse.orchestrator.pipeline import ray_session\n"
        "with ray_session(None, 1):\n"
        "    seen = ray.get(ray.remote(lambda: os.environ.get('OMP_WAIT_POLICY')).remote())\n"
        "print('seen', seen)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seen PASSIVE" in out.stdout
