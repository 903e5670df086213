"""Invariants of k-means and MLP Fusion on tiny random FF blocks (GLU and non-GLU with biases)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.fusion import FusedMLP, fuse_ff, sub_mlp_vectors
from mlpfuse.stages.math.kmeans import greedy_kmeanspp, kmeans

H, I = 16, 48
# (glu, act) pairs: SwiGLU without biases (Llama-style) and GELU with both biases (BERT/GPT-2).
LAYOUTS = [(True, "silu"), (False, "gelu")]


def random_ff(glu: bool, act: str, n: int = I, seed: int = 0, dtype=torch.float32) -> FFWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    if glu:
        return FFWeights(up=r(n, H), gate=r(n, H), down=r(H, n), act=act)
    return FFWeights(up=r(n, H), b_up=r(n), down=r(H, n), b_down=r(H), act=act)


def duplicated_ff(glu: bool, act: str, sizes: list[int], seed: int = 0) -> FFWeights:
    """Groups of exact duplicate neurons (group g repeated sizes[g] times), shuffled; down columns
    are divided by the group size so the function does not grow with it."""
    base = random_ff(glu, act, n=len(sizes), seed=seed, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index = index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed + 1))]
    dup = base.select(index)
    return replace(dup, down=dup.down / torch.tensor(sizes, dtype=torch.float64)[index])


class PlainMLP(nn.Module):
    """The original block as an ordinary module with nn.Linear layers (what a model would hold)."""

    def __init__(self, ff: FFWeights) -> None:
        super().__init__()

        def linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            return lin

        self.up = linear(ff.up, ff.b_up)
        self.gate = None if ff.gate is None else linear(ff.gate, None)
        self.down = linear(ff.down, ff.b_down)
        self.act = ACT2FN[ff.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(x)
        return self.down(self.act(u) if self.gate is None else self.act(self.gate(x)) * u)


def x_batch(n: int = 64, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- k-means


def test_kmeans_k_equals_n_gives_each_point_its_own_cluster() -> None:
    pts = np.random.default_rng(0).standard_normal((40, 7)).astype(np.float32)
    res = kmeans(pts, 40, iters=5, seed=0)
    assert np.array_equal(res.assign, np.arange(40))
    assert np.array_equal(res.centroids, pts)
    assert res.inertia == 0.0


@pytest.mark.parametrize("init", ["kmeans++", "random"])
@pytest.mark.parametrize("k", [1, 5, 19, 30])
def test_kmeans_clusters_nonempty_and_centroids_are_weighted_means(k: int, init: str) -> None:
    rng = np.random.default_rng(k)
    # Duplicated points (fewer distinct points than k for k=30) exercise the exact/split path.
    pts = np.repeat(rng.standard_normal((20, 5)).astype(np.float32), 2, axis=0)
    w = rng.random(40) + 0.1
    res = kmeans(pts, k, iters=10, seed=3, weights=w, init=init)
    assert res.centroids.shape == (k, 5) and res.assign.shape == (40,)
    assert np.bincount(res.assign, minlength=k).min() >= 1
    for c in range(k):
        m = res.assign == c
        np.testing.assert_allclose(
            res.centroids[c], np.average(pts[m], axis=0, weights=w[m]), rtol=1e-5, atol=1e-6
        )
    expected = sum(w[i] * np.sum((pts[i] - res.centroids[res.assign[i]]) ** 2) for i in range(40))
    assert res.inertia == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_weighted_kmeans_is_deterministic_for_a_seed(init: str) -> None:
    rng = np.random.default_rng(7)
    pts, w = rng.standard_normal((300, 12)).astype(np.float32), rng.random(300)
    a = kmeans(pts, 17, iters=20, seed=11, weights=w, n_init=2, init=init)
    b = kmeans(pts, 17, iters=20, seed=11, weights=w, n_init=2, init=init)
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    assert a.iters == 40  # iterations as asked: no early stop (2 restarts x 20)


def test_torch_kmeans_without_faiss_matches_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with only PyTorch (no faiss), the same weighted Lloyd iterations run in torch:
    same guarantees (non-empty clusters, centroids the weighted means), same seeds, an objective
    within 1 % of faiss's on sub-MLP-like points."""
    import builtins

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((12, 16)).astype(np.float32) * 3
    pts = (centres[rng.integers(0, 12, 600)] + rng.standard_normal((600, 16))).astype(np.float32)
    w = rng.random(600) + 0.1
    with_faiss = kmeans(pts, 12, iters=15, seed=2, weights=w, n_init=2)
    real_import = builtins.__import__

    def no_faiss(name: str, *a: object, **kw: object) -> object:
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    torch_only = kmeans(pts, 12, iters=15, seed=2, weights=w, n_init=2)
    again = kmeans(pts, 12, iters=15, seed=2, weights=w, n_init=2)
    assert np.array_equal(torch_only.assign, again.assign)  # deterministic for a seed
    assert np.bincount(torch_only.assign, minlength=12).min() >= 1 and torch_only.iters == 30
    for c in range(12):
        m = torch_only.assign == c
        np.testing.assert_allclose(torch_only.centroids[c], np.average(pts[m], axis=0, weights=w[m]),
                                   rtol=1e-5, atol=1e-5)
    assert torch_only.inertia == pytest.approx(with_faiss.inertia, rel=0.01)


def test_greedy_kmeanspp_picks_distinct_points() -> None:
    rng = np.random.default_rng(3)
    pts = rng.standard_normal((60, 4)).astype(np.float32)
    centres = greedy_kmeanspp(pts, rng.random(60) + 0.01, 60, np.random.default_rng(0))
    # With k = n every point must be picked once: a repeat would mean sampling a zero-mass point.
    assert len(np.unique(centres, axis=0)) == 60


@pytest.mark.parametrize("k", [0, 41])
def test_kmeans_rejects_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=f"k={k}"):
        kmeans(np.zeros((40, 3), np.float32), k, iters=5, seed=0)


# ---------------------------------------------------------------- fusion


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_sub_mlp_vectors_layout(glu: bool, act: str) -> None:
    ff = random_ff(glu, act)
    v = sub_mlp_vectors(ff, scale=np.full(I, 2.0))
    assert v.shape == (I, 3 * H if glu else 2 * H + 1) and v.dtype == np.float32
    np.testing.assert_array_equal(v[:, :H], 2 * ff.up.numpy())
    np.testing.assert_array_equal(v[:, -H:], 2 * ff.down.T.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["fusion", "cluster"])
@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_k_equals_I_reproduces_the_block(
    glu: bool, act: str, mode: str, dtype: torch.dtype
) -> None:
    ff, x = random_ff(glu, act, dtype=dtype), x_batch(dtype=dtype)
    fused = fuse_ff(ff, I, mode=mode)
    assert torch.equal(fused.counts, torch.ones(I)) and fused.ff.up.dtype == dtype
    torch.testing.assert_close(fused.forward(x), ff.forward(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(FusedMLP.from_fused(fused)(x), ff.forward(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_duplicate_groups_fuse_exactly_and_train_identically_under_adam(
    glu: bool, act: str
) -> None:
    sizes = [1, 3, 2, 4, 1, 2, 5, 2]
    ff = duplicated_ff(glu, act, sizes)
    x = x_batch(32, torch.float64)
    target = x_batch(32, torch.float64, seed=9)
    fused = fuse_ff(ff, len(sizes))
    assert sorted(fused.counts.tolist()) == sorted(sizes)

    original, student = PlainMLP(ff), FusedMLP.from_fused(fused)
    torch.testing.assert_close(student(x), original(x), rtol=0, atol=1e-5)
    assert [n for n, _ in student.named_buffers()] == ["scale"]
    assert all(p.requires_grad for p in student.parameters())

    # Each centroid's gradient is P_c times its members' (identical) gradients, and Adam's first
    # step is invariant to that scale (up to eps): the fused block moves as the original does.
    adam_step(original, x, target)
    adam_step(student, x, target)
    with torch.no_grad():
        assert (original(x) - PlainMLP(ff)(x)).abs().max() > 1e-3  # the step changed the function
        torch.testing.assert_close(student(x), original(x), rtol=0, atol=1e-5)


def adam_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """One default Adam step on the MSE to ``target``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), target).backward()
    opt.step()


def test_cluster_baseline_equals_fusion_for_relu_but_trains_differently() -> None:
    """sqrt(P) folded on both sides commutes with a positively homogeneous activation, so the
    baseline starts as the same function; parameterised differently, it does not follow the
    original under Adam the way "fusion" does."""
    ff = duplicated_ff(False, "relu", [3, 1, 4, 2, 2])
    x, target = x_batch(32, torch.float64), x_batch(32, torch.float64, seed=9)
    fusion, cluster = fuse_ff(ff, 5, mode="fusion"), fuse_ff(ff, 5, mode="cluster")
    assert torch.equal(fusion.assign, cluster.assign)
    torch.testing.assert_close(cluster.forward(x), fusion.forward(x), rtol=0, atol=1e-6)
    original, baseline = PlainMLP(ff), FusedMLP.from_fused(cluster)
    adam_step(original, x, target)
    adam_step(baseline, x, target)
    with torch.no_grad():
        assert (baseline(x) - original(x)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["fusion", "cluster"])
@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_fold_equals_training_form(glu: bool, act: str, mode: str) -> None:
    ff, x = random_ff(glu, act), x_batch()
    fused = fuse_ff(ff, 10, seed=2, mode=mode)
    module = FusedMLP.from_fused(fused)
    folded = fused.fold()
    assert folded.intermediate_size == 10 and folded.num_params() == module.to_ff().num_params()
    torch.testing.assert_close(folded.forward(x), module(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.to_ff().forward(x), module(x), rtol=1e-5, atol=1e-6)
    assert (ff.b_down is None) == (folded.b_down is None) and (ff.b_up is None) == (
        folded.b_up is None
    )


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_data_aware_fusion_is_deterministic_and_unscales_centroids(glu: bool, act: str) -> None:
    ff = random_ff(glu, act)
    energy = ff.hidden(x_batch(256)).square().mean(0).numpy()
    kwargs = {"seed": 5, "iters": 20, "weights": energy, "scale_by_sqrt_energy": energy}
    a, b = fuse_ff(ff, 9, **kwargs), fuse_ff(ff, 9, **kwargs)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.ff.up, b.ff.up)
    # Un-scaled centroid = mean of the members' raw vectors weighted by weight * sqrt(energy).
    raw, coef = sub_mlp_vectors(ff).astype(np.float64), energy * np.sqrt(energy)
    got = sub_mlp_vectors(a.ff)
    for c in range(9):
        m = (a.assign == c).numpy()
        np.testing.assert_allclose(
            got[c], np.average(raw[m], axis=0, weights=coef[m]), rtol=1e-4, atol=1e-6
        )


def test_fuse_rejects_bad_inputs() -> None:
    ff = random_ff(True, "silu")
    with pytest.raises(ValueError, match=f"k={I + 1}"):
        fuse_ff(ff, I + 1)
    with pytest.raises(ValueError, match="mode"):
        fuse_ff(ff, 4, mode="average")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        fuse_ff(ff, 4, weights=np.ones(I - 1))


@pytest.mark.parametrize("mt", ["llama", "mixtral", "qwen2_moe"])
def test_k_equals_I_reproduces_every_expert_end_to_end(mt: str, tiny_checkpoints, tmp_path) -> None:
    """``fusion`` with ratio 1 (k = I in every block: each expert, the shared expert, dense MLPs)
    through the compress stage and the streamed runner: the model's logits are unchanged."""
    from mlpfuse.stages import compress, shard
    from mlpfuse.stages.model.overlay import load_overrides
    from mlpfuse.stages.model.runner import LayerStreamedModel

    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints[mt])), {}, sd)
    ov = tmp_path / "fused"
    ov.mkdir()
    res = compress.run(compress.CompressConfig.model_validate({"candidate": {"method": "fusion", "ratio": 1.0}}),
                       {"shard": sd}, ov)
    assert res["changed_layers"]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    base = LayerStreamedModel(sd).logits(ids)
    fused = LayerStreamedModel(sd, overrides=load_overrides(ov)).logits(ids)
    assert float((fused - base).abs().max()) <= 1e-5
