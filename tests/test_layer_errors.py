"""probe + layer_errors: per-layer reconstruction and NTK errors of a candidate on tiny models;
the closed-form kernels equal a per-token autograd loop (dense, biased, with P, MoE)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from mlpfuse.stages import compress, layer_errors, shard
from mlpfuse.stages.layer_errors import LayerErrorsConfig, ProbeConfig
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.ntk import ff_kernels, rel_error
from mlpfuse.stages.model.overlay import Overlay, save_overlay
from mlpfuse.stages.model.runner import LayerStreamedModel
from mlpfuse.stages.model.shards import layer_file
from tests.conftest import make_tiny

CFG = LayerErrorsConfig(ntk_tokens=24, seed=1)


def _data(d: Path, vocab: int = 128) -> Path:
    """A data artifact's held-out split (``eval.parquet`` as mlpfuse.stages.data writes it)."""
    d.mkdir()
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, vocab, n).astype(np.int32).tolist() for n in (70, 50)]
    pq.write_table(pa.table({"doc": ["a", "b"], "input_ids": pa.array(ids, type=pa.list_(pa.int32()))}),
                   d / "eval.parquet")
    return d


_BUILT: dict[str, dict[str, Path]] = {}


@pytest.fixture
def arts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """shard, data and probe of a tiny model of ``request.param`` (built once per module)."""
    mt = request.param
    if mt not in _BUILT:
        root = tmp_path_factory.mktemp(f"le-{mt}")
        out = {"shard": root / "shard", "data": _data(root / "data"), "probe": root / "probe",
               "ckpt": make_tiny(mt, root / "ckpt")}
        shard.run(shard.ShardConfig(model=str(out["ckpt"])), {}, out["shard"])
        meta = layer_errors.run_probe(ProbeConfig(tokens=100, window=40), out, out["probe"])
        assert meta["tokens"] == 100 and meta["sequences"] == 3
        _BUILT[mt] = out
    return _BUILT[mt]


def _candidate(arts: dict[str, Path], tmp: Path, candidate: dict, **kw) -> dict:
    ov = tmp / f"ov-{len(list(tmp.glob('ov-*')))}"
    compress.run(compress.CompressConfig.model_validate({"candidate": candidate, **kw}), {"shard": arts["shard"]}, ov)
    return _errors(arts, tmp, ov)


def _errors(arts: dict[str, Path], tmp: Path, overlay: Path) -> dict:
    out = tmp / f"le-{len(list(tmp.glob('le-*')))}"
    res = layer_errors.run(CFG, {"shard": arts["shard"], "probe": arts["probe"], "overlay": overlay}, out)
    assert json.loads((out / "layer_errors.json").read_text()) == res
    return res


def _changed(res: dict) -> list[int]:
    return [i for i, v in zip(res["layers"], res["recon"], strict=True) if v is not None]


# ----- the probe --------------------------------------------------------------------------------
@pytest.mark.parametrize("arts", ["llama"], indirect=True)
def test_probe_holds_the_ff_inputs_of_the_original_model(arts: dict[str, Path]) -> None:
    """The stored x of a layer is what its FF module receives in a plain forward."""
    from transformers import AutoModelForCausalLM

    ids = pq.read_table(arts["data"] / "eval.parquet").column("input_ids").to_pylist()[0][:40]
    model = AutoModelForCausalLM.from_pretrained(arts["ckpt"]).eval()
    seen = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0][0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for i in seen:  # the first 40-token window of doc a is the probe's first batch row
        torch.testing.assert_close(layer_errors.read_probe(arts["probe"], i)[:40], seen[i], atol=1e-5, rtol=1e-4)


# ----- (a) nothing changed; (c) permuted neurons; (d) pruned ----------------------------------------
@pytest.mark.parametrize("arts", ["llama"], indirect=True)
@pytest.mark.parametrize("candidate", [
    {"method": "fusion", "ratio": 1.0, "layers": [1, 2]},  # k = I: every neuron its own centroid
    {"method": "prune", "criterion": "magnitude", "ratio": 1.0, "layers": [1, 2]},
])
def test_an_overlay_that_changes_nothing_has_zero_error(arts: dict[str, Path], tmp_path: Path, candidate: dict) -> None:
    res = _candidate(arts, tmp_path, candidate)
    assert _changed(res) == [1, 2] and res["recon"][0] is None
    for i in (1, 2):
        assert res["recon"][i] < 1e-6 and res["ntk"][i] < 1e-6 and res["ntk_sign"][i] < 1e-6


@pytest.mark.parametrize("arts", ["llama"], indirect=True)
def test_permuted_neurons_have_zero_error(arts: dict[str, Path], tmp_path: Path) -> None:
    sh = arts["shard"]
    model = LayerStreamedModel(sh)
    fam, cfg = model.family, model.config
    blocks = {}
    for i in (0, 2):
        sd = model.layer_state(i)
        blocks[i] = {r: fam.read_ff(cfg, sd, r).select(torch.randperm(48, generator=torch.Generator().manual_seed(i)))
                     for r in fam.ff_blocks(cfg, sd)}
    ov = tmp_path / "perm"
    save_overlay(ov, Overlay(blocks=blocks), fam, cfg, lambda i: load_file(str(sh / layer_file(i))))
    res = _errors(arts, tmp_path, ov)
    assert _changed(res) == [0, 2]
    for i in (0, 2):
        assert res["recon"][i] < 1e-6 and res["ntk"][i] < 1e-9 and res["ntk_sign"][i] < 1e-9


@pytest.mark.parametrize("arts", ["llama"], indirect=True)
def test_pruned_and_dropped_layers(arts: dict[str, Path], tmp_path: Path) -> None:
    res = _candidate(arts, tmp_path, {"method": "prune", "criterion": "magnitude", "ratio": 0.5, "layers": [0, 2]},
                     drop=[1])
    assert res["skipped"] == [1] and res["recon"][1] == res["ntk"][1] == res["ntk_sign"][1] == 1.0
    for i in (0, 2):
        for k in ("recon", "ntk", "ntk_sign"):
            assert 0 < res[k][i] < 10 and np.isfinite(res[k][i])
    assert res["p_stored"] is False and res["tokens"] == 100 and res["ntk_tokens"] == 24


# ----- (e) families through the stage -----------------------------------------------------------------
@pytest.mark.parametrize("arts", ["gpt2", "qwen2_moe", "mixtral"], indirect=True)
def test_families_through_the_stage(arts: dict[str, Path], tmp_path: Path) -> None:
    same = _candidate(arts, tmp_path, {"method": "prune", "criterion": "magnitude", "ratio": 1.0})
    fused = _candidate(arts, tmp_path, {"method": "fusion", "ratio": 0.5, "iters": 5})
    assert _changed(same) == _changed(fused) == [0, 1]
    for i in (0, 1):
        assert same["recon"][i] < 1e-6 and same["ntk"][i] < 1e-6
        assert 0 < fused["recon"][i] < 10 and 0 < fused["ntk"][i] < 10 and 0 < fused["ntk_sign"][i] < 10


@pytest.mark.parametrize("arts", ["llama"], indirect=True)
def test_stored_counts_select_the_training_form(arts: dict[str, Path], tmp_path: Path) -> None:
    """With ``counts.safetensors`` (P) the down part of the kernel is that of down_c (P ⊙ h); the
    block's output, and so the reconstruction error, are unchanged."""
    ov = tmp_path / "fused"
    compress.run(compress.CompressConfig.model_validate({"candidate": {"method": "fusion", "ratio": 0.25, "layers": [1]}}),
                 {"shard": arts["shard"]}, ov)
    folded = _errors(arts, tmp_path, ov)
    save_file({"L00001/mlp": torch.full((12,), 4.0)}, str(ov / layer_errors.COUNTS))
    with_p = _errors(arts, tmp_path, ov)
    assert with_p["p_stored"] and with_p["recon"][1] == pytest.approx(folded["recon"][1])
    assert with_p["ntk"][1] != pytest.approx(folded["ntk"][1])


# ----- (b) closed form == per-token autograd ------------------------------------------------------
def _brute(params: dict[str, torch.Tensor], f, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Θ = J Jᵀ and J sign(J)ᵀ from one autograd call per token."""
    rows = []
    for t in range(x.shape[0]):
        s = (f(x[t : t + 1]).reshape(-1) * r).sum()
        grads = torch.autograd.grad(s, list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(params.values(), grads, strict=True)]))
    j = torch.stack(rows).double()
    return j @ j.T, j @ torch.sign(j).T


def _ff(glu: bool, bias: bool, act: str, i: int = 20, h: int = 8, seed: int = 0) -> FFWeights:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return FFWeights(up=rnd(i, h), down=rnd(h, i) / 4, act=act, gate=rnd(i, h) if glu else None,
                     b_up=rnd(i) if bias else None, b_down=rnd(h) if bias else None)


@pytest.mark.parametrize("glu,bias,act", [(True, False, "silu"), (False, True, "gelu_new"), (True, True, "gelu"),
                                          (False, False, "relu")])
@pytest.mark.parametrize("with_p", [False, True])
def test_closed_form_kernels_match_autograd(glu: bool, bias: bool, act: str, with_p: bool) -> None:
    from mlpfuse.stages.math.fusion import FusedMLP

    ff = _ff(glu, bias, act)
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = torch.randn(8, dtype=torch.float64)
    p = torch.arange(1, 21, dtype=torch.float64) % 5 + 1 if with_p else None
    # The training form: centroids down_c = down / P, P a fixed buffer (FusedMLP).
    train = ff if p is None else FFWeights(**{**ff.__dict__, "down": ff.down / p})
    m = FusedMLP(train, p).double()
    params = dict(m.named_parameters())
    ntk, sign = _brute(params, m, x, r)
    k = ff_kernels(ff, x, r, p)
    torch.testing.assert_close(k.ntk, ntk, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(k.sign, sign, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arts", ["qwen2_moe", "mixtral"], indirect=True)
def test_moe_kernels_match_autograd_through_the_module(arts: dict[str, Path]) -> None:
    """The routed mixture's kernels equal those of the family's own MoE module, differentiated
    per token w.r.t. every expert's (and the shared expert's) weights, router fixed."""
    model = LayerStreamedModel(arts["shard"])
    i = 1
    x = layer_errors.read_probe(arts["probe"], i)[:8]
    r = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sd = model.layer_state(i)
    blocks = layer_errors._blocks(model.family, model.config, sd)
    mix = layer_errors._mixing(model, i, sd, list(blocks), x.double())
    k = layer_errors._layer_kernels(blocks, mix, x.double(), r, {})
    with model.layer(i, sd) as layer, torch.enable_grad():
        moe = layer.get_submodule("mlp")
        params = {n: p for n, p in moe.named_parameters() if "experts" in n or "shared_expert." in n}
        assert any("shared" in n for n in params) == (model.config.model_type == "qwen2_moe")
        for p in params.values():
            p.requires_grad_(True)
        ntk, sign = _brute(params, lambda xt: moe(xt[None]), x, r.float())
    assert rel_error(k.ntk, ntk) < 1e-5 and rel_error(k.sign, sign) < 1e-5


def test_duplicated_neurons_fuse_exactly_in_the_kernel_of_their_form() -> None:
    """A block of neurons each repeated 3 times, fused into its 1/3 (k-means finds the copies):
    with P the SignGD (Adam) kernel is exact, and the plain kernel is not; the √P "cluster" form
    (ReLU) keeps the plain kernel exactly. Outputs are exact in both."""
    from mlpfuse.stages.math.fusion import fuse_ff

    base = _ff(False, True, "relu", i=10)
    dup = base.select(torch.arange(10).repeat(3))
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = torch.randn(8, dtype=torch.float64)
    r = r / r.norm()
    k0 = ff_kernels(dup, x, r)
    fused = fuse_ff(dup.to(torch.float32), 10, mode="fusion")
    clus = fuse_ff(dup.to(torch.float32), 10, mode="cluster")
    assert sorted(fused.counts.tolist()) == [3.0] * 10
    kp = ff_kernels(fused.fold(), x, r, fused.counts)
    kc = ff_kernels(clus.fold(), x, r)
    assert rel_error(fused.fold().to(torch.float64).forward(x), dup.forward(x)) < 1e-5
    assert rel_error(kp.sign, k0.sign) < 1e-5 and rel_error(kp.ntk, k0.ntk) > 0.5
    assert rel_error(kc.ntk, k0.ntk) < 1e-5


def test_score_layers_wires_probe_and_candidates(tmp_path: Path) -> None:
    """One probe node and one layer_errors node per candidate, run as one group through the
    registered stages (a stand-in session that executes nodes in order)."""
    from mlpfuse.orchestrator.layer_errors import score_layers
    from mlpfuse.orchestrator.pipeline import execute_node, make_node
    from mlpfuse.orchestrator.store import ArtifactStore

    store = ArtifactStore(tmp_path / "cache")
    root = tmp_path / "w"
    root.mkdir()

    class FakeSession:
        def __init__(self) -> None:
            self.results: dict[str, dict] = {}
            self.groups: list[list[str]] = []

        @property
        def keys(self) -> dict[str, str]:
            return {n: r["key"] for n, r in self.results.items()}

        def run(self, nodes: list) -> dict:
            from dataclasses import asdict

            self.groups.append([n.name for n in nodes])
            for n in nodes:
                ups = [self.results[u] for u in n.inputs.values()]
                self.results[n.name] = execute_node(str(store.root), asdict(n), *ups)
            return {n.name: self.results[n.name] for n in nodes}

    s = FakeSession()
    ckpt = make_tiny("llama", root / "ckpt")
    s.run([make_node(s.keys, "shard", "shard", shard.ShardConfig(model=str(ckpt)))])
    _data(store.staging_dir("data", "d" * 24))
    store.commit("data", "d" * 24, store.staging_dir("data", "d" * 24), {"result": {}})
    s.results["data"] = {"name": "data", "stage": "data", "key": "d" * 24, "result": {}}
    cands = {"p": {"method": "prune", "criterion": "magnitude", "ratio": 0.5, "layers": [1]},
             "f": {"method": "fusion", "ratio": 0.5, "layers": [0, 2], "iters": 5}}
    s.run([make_node(s.keys, f"compress.{n}", "compress", compress.CompressConfig.model_validate({"candidate": c}),
                     {"shard": "shard"}) for n, c in cands.items()])
    out = score_layers(s, None, list(cands), probe=ProbeConfig(tokens=64, window=32), config=CFG)
    assert s.groups[-1] == ["probe", "layer_errors.p", "layer_errors.f"]
    assert set(out) == {"recon", "ntk", "ntk_sign"} and set(out["recon"]) == {"p", "f"}
    assert [v is None for v in out["recon"]["p"]] == [True, False, True]
    assert [v is None for v in out["ntk"]["f"]] == [False, True, False]
