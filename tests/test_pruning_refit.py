"""Invariants of the pruning baselines and the least-squares down-projection refit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.fusion import fuse_ff
from mlpfuse.stages.math.pruning import (
    activation_scores,
    gram_sse,
    kept_neurons,
    magnitude_scores,
    obs_prune,
    prune_ff,
    random_scores,
)
from mlpfuse.stages.math.refit import RefitAccumulator, refit_down

H, I = 16, 48
LAYOUTS = [(True, "silu"), (False, "gelu")]


def random_ff(glu: bool, act: str, seed: int = 0, dtype=torch.float64) -> FFWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    if glu:
        return FFWeights(up=r(I, H), gate=r(I, H), down=r(H, I), act=act)
    return FFWeights(up=r(I, H), b_up=r(I), down=r(H, I), b_down=r(H), act=act)


def tokens(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fill(
    acc: RefitAccumulator, compressed: FFWeights, original: FFWeights, x: torch.Tensor, chunk: int
) -> None:
    for xs in x.split(chunk):
        acc.update(compressed.hidden(xs), original.forward(xs))


def sse(ff: FFWeights, original: FFWeights, x: torch.Tensor) -> float:
    return float((ff.forward(x) - original.forward(x)).square().sum())


# ---------------------------------------------------------------- pruning


def score_fns(ff: FFWeights) -> dict[str, torch.Tensor]:
    h_sq = ff.hidden(tokens(128)).square().mean(0)
    return {
        "magnitude": magnitude_scores(ff),
        "random": random_scores(ff, seed=3),
        "activation": activation_scores(ff, h_sq),
    }


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_prune_all_neurons_reproduces_the_block(glu: bool, act: str) -> None:
    ff, x = random_ff(glu, act), tokens(32)
    for scores in [torch.arange(I, dtype=torch.float32), *score_fns(ff).values()]:
        kept = prune_ff(ff, I, scores)
        torch.testing.assert_close(kept.forward(x), ff.forward(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_prune_keeps_top_k_in_original_order(glu: bool, act: str) -> None:
    ff = random_ff(glu, act)
    # Tag each neuron by its (unique) down column so the kept neurons can be identified.
    tag = ff.down[0]
    for name, scores in score_fns(ff).items():
        kept = prune_ff(ff, 10, scores)
        index = torch.tensor([int((tag == t).nonzero()) for t in kept.down[0]])
        assert torch.equal(index, index.sort().values), name
        assert set(index.tolist()) == set(scores.topk(10).indices.tolist()), name
        assert kept.intermediate_size == 10


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_scores_follow_a_neuron_permutation(glu: bool, act: str) -> None:
    ff = random_ff(glu, act)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(5))
    permuted = ff.select(perm)
    h_sq = ff.hidden(tokens(64)).square().mean(0)
    torch.testing.assert_close(magnitude_scores(permuted), magnitude_scores(ff)[perm])
    torch.testing.assert_close(
        activation_scores(permuted, h_sq[perm]), activation_scores(ff, h_sq)[perm]
    )
    assert torch.equal(random_scores(ff, 1), random_scores(ff, 1))


def test_glu_magnitude_uses_gate_and_up_together() -> None:
    ff = random_ff(True, "silu")
    no_gate = FFWeights(up=ff.up, gate=torch.zeros_like(ff.gate), down=ff.down, act=ff.act)
    only_gate = FFWeights(up=torch.zeros_like(ff.up), gate=ff.gate, down=ff.down, act=ff.act)
    torch.testing.assert_close(
        magnitude_scores(ff).square(),
        magnitude_scores(no_gate).square() + magnitude_scores(only_gate).square(),
    )


def test_prune_rejects_bad_inputs() -> None:
    ff = random_ff(True, "silu")
    with pytest.raises(ValueError, match="k=0"):
        prune_ff(ff, 0, magnitude_scores(ff))
    with pytest.raises(ValueError, match=f"k={I + 1}"):
        prune_ff(ff, I + 1, magnitude_scores(ff))
    with pytest.raises(ValueError, match="shape"):
        prune_ff(ff, 4, torch.ones(I - 1))


# ---------------------------------------------------------------- refit


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_refit_with_nothing_removed_returns_the_original_down(glu: bool, act: str) -> None:
    ff = random_ff(glu, act)
    acc = RefitAccumulator(I, H, bias=ff.b_down is not None)
    fill(acc, ff, ff, tokens(400), chunk=128)
    refit = refit_down(ff, acc, lam=1e-10)
    torch.testing.assert_close(refit.down, ff.down, rtol=0, atol=1e-6)
    if ff.b_down is not None:
        torch.testing.assert_close(refit.b_down, ff.b_down, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "fusion"])
@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_refit_never_increases_calibration_error(glu: bool, act: str, method: str) -> None:
    ff, x = random_ff(glu, act), tokens(300)
    compressed = (
        prune_ff(ff, 12, magnitude_scores(ff))
        if method == "magnitude"
        else fuse_ff(ff, 12, seed=1).fold()
    )
    acc = RefitAccumulator(12, H, bias=ff.b_down is not None)
    fill(acc, compressed, ff, x, chunk=64)
    before = sse(compressed, ff, x)
    assert acc.sse(compressed.down, compressed.b_down) == pytest.approx(before, rel=1e-9)
    for lam in [0.0, 1e-8, 1e-4]:
        refit = refit_down(compressed, acc, lam)
        assert sse(refit, ff, x) <= before * (1 + 1e-9), lam
        assert acc.sse(refit.down, refit.b_down) == pytest.approx(sse(refit, ff, x), rel=1e-9)


def test_singular_statistics_fall_back_to_minimum_norm_least_squares() -> None:
    """A dead neuron (H column all zero) makes H^T H singular at lam=0; its weight comes out zero
    and the fit is still no worse than the un-refit block."""
    ff, x = random_ff(False, "gelu"), tokens(200)
    dead = FFWeights(
        up=ff.up.clone(), b_up=ff.b_up.clone(), down=ff.down, b_down=ff.b_down, act="relu"
    )
    dead.up[3], dead.b_up[3] = 0.0, -1.0  # relu(-1) = 0 on every token
    acc = RefitAccumulator(I, H, bias=True)
    fill(acc, dead, ff, x, chunk=100)
    refit = refit_down(dead, acc, lam=0.0)
    assert torch.isfinite(refit.down).all()
    assert refit.down[:, 3].abs().max() < 1e-8
    assert sse(refit, ff, x) <= sse(dead, ff, x)


@pytest.mark.parametrize("bias", [False, True])
def test_streamed_statistics_equal_one_shot_products(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(250, 7, generator=g), torch.randn(250, 5, generator=g)
    acc = RefitAccumulator(7, 5, bias=bias)
    for lo, hi in [(0, 1), (1, 64), (64, 65), (65, 250)]:  # uneven chunks, one of a single row
        acc.update(h[lo:hi], y[lo:hi])
    ha = torch.cat([h, torch.ones(250, 1)], 1) if bias else h
    ha, y64 = ha.double(), y.double()
    # float32 features: float32 chunk products summed in float64 (float32 rounding)
    torch.testing.assert_close(acc.hth, ha.T @ ha, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(acc.hty, ha.T @ y64, rtol=1e-6, atol=1e-5)
    assert acc.n == 250 and acc.yty == pytest.approx(float(y64.square().sum()), rel=1e-6)
    exact = RefitAccumulator(7, 5, bias=bias)  # float64 features: exact
    for lo, hi in [(0, 1), (1, 64), (64, 65), (65, 250)]:
        exact.update(h[lo:hi].double(), y[lo:hi].double())
    torch.testing.assert_close(exact.hth, ha.T @ ha, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(exact.hty, ha.T @ y64, rtol=1e-12, atol=1e-10)


def test_tied_layers_fit_jointly_and_merged_accumulators_match() -> None:
    """A window of layers sharing one down projection: one accumulator over every layer's tokens,
    per-layer accumulators merged, and a solve on the concatenated data agree."""
    layers = [random_ff(False, "gelu", seed=s) for s in range(3)]
    shared = prune_ff(layers[0], 12, magnitude_scores(layers[0]))
    joint = RefitAccumulator(12, H, bias=True)
    merged = RefitAccumulator(12, H, bias=True)
    hs, ys = [], []
    for i, layer in enumerate(layers):
        x = tokens(200, seed=10 + i)
        fill(joint, shared, layer, x, chunk=50)
        part = RefitAccumulator(12, H, bias=True)
        fill(part, shared, layer, x, chunk=200)
        merged.merge(part)
        hs.append(shared.hidden(x))
        ys.append(layer.forward(x))
    h, y = torch.cat(hs), torch.cat(ys)
    ha = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    direct = torch.linalg.lstsq(ha, y).solution
    for acc in (joint, merged):
        w, b = acc.solve(0.0)
        torch.testing.assert_close(w, direct[:12].T, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(b, direct[12], rtol=1e-7, atol=1e-9)


def test_relative_ridge_is_scale_free() -> None:
    """lambda is relative to mean(diag(H^T H)): scaling H by c scales W by 1/c and leaves b."""
    g = torch.Generator().manual_seed(2)
    h, y = (
        torch.randn(100, 6, generator=g, dtype=torch.float64),
        torch.randn(100, 4, generator=g, dtype=torch.float64),
    )
    solutions = []
    for c in (1.0, 1e3):
        acc = RefitAccumulator(6, 4, bias=True)
        acc.update(h * c, y)
        solutions.append(acc.solve(0.5))
    (w1, b1), (w2, b2) = solutions
    torch.testing.assert_close(w2 * 1e3, w1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b2, b1, rtol=1e-9, atol=1e-12)


def test_refit_rejects_mismatches() -> None:
    ff = random_ff(True, "silu")
    with pytest.raises(ValueError, match="bias"):
        refit_down(ff, RefitAccumulator(I, H, bias=True), 0.0)
    with pytest.raises(ValueError, match="k=12"):
        refit_down(ff, RefitAccumulator(12, H, bias=False), 0.0)
    acc = RefitAccumulator(I, H, bias=False)
    with pytest.raises(ValueError, match="no samples"):
        acc.solve(0.0)
    with pytest.raises(ValueError, match=r"H \[n, 48\]"):
        acc.update(torch.zeros(3, 5), torch.zeros(3, H))


class _Ctx:
    """What sensitivity allocation reads from the compress context."""

    def __init__(self, blocks: list[FFWeights]):
        from mlpfuse.stages.model.families import FFBlockRef


        self.num_layers = len(blocks)
        self._blocks = [{FFBlockRef("dense"): ff} for ff in blocks]

    def refs(self, i: int) -> list:
        return list(self._blocks[i])

    def block(self, i: int, ref) -> FFWeights:  # noqa: ANN001
        return self._blocks[i][ref]


def test_sensitivity_allocation_keeps_the_uniform_total_and_spares_spread_out_blocks() -> None:
    from mlpfuse.stages.methods.prune import PruneMethod, sensitivity_sizes
    from mlpfuse.stages.model.families import FFBlockRef


    spread = random_ff(True, "silu", seed=0)
    peaked = random_ff(True, "silu", seed=1)
    peaked.down[:, :4] *= 50.0  # four neurons carry almost all of this block's magnitude
    ctx = _Ctx([spread, peaked])
    m = PruneMethod(criterion="magnitude", ratio=0.5, allocation="sensitivity", min_ratio=0.125)
    sizes = sensitivity_sizes(m, ctx)  # type: ignore[arg-type]
    ref = FFBlockRef("dense")
    assert sum(sizes.values()) == 2 * m.k(I)
    assert sizes[(1, ref)] < m.k(I) < sizes[(0, ref)]
    assert all(v >= int(0.125 * I) for v in sizes.values())
    uniform = sensitivity_sizes(PruneMethod(criterion="magnitude", ratio=0.5, allocation="sensitivity",
                                             min_ratio=0.5), ctx)  # type: ignore[arg-type]
    assert uniform == {(0, ref): m.k(I), (1, ref): m.k(I)}  # floors at the uniform size leave no choice
    with pytest.raises(Exception, match="min_ratio"):
        sensitivity_sizes(PruneMethod(criterion="magnitude", ratio=0.25, allocation="sensitivity",
                                       min_ratio=0.5), ctx)  # type: ignore[arg-type]


# ---------------------------------------------------------------- structured OBS


def _gram(ff: FFWeights, x: torch.Tensor) -> torch.Tensor:
    h = ff.hidden(x).double()
    return h.T @ h


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_obs_keeping_every_neuron_reproduces_the_block(glu: bool, act: str) -> None:
    ff, x = random_ff(glu, act), tokens(256)
    kept, down = obs_prune(ff.down, _gram(ff, x), I)
    assert kept.tolist() == list(range(I))
    torch.testing.assert_close(down.double(), ff.down.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_obs_compensation_is_the_least_squares_fit_of_its_kept_neurons(glu: bool, act: str) -> None:
    """With no ridge, the updates OBS applies on the way leave exactly the least-squares down
    projection of the neurons it kept: what a refit would solve."""
    ff, x = random_ff(glu, act), tokens(512)
    g = _gram(ff, x)
    kept, down = obs_prune(ff.down, g, 20, lam=1e-12, steps=7)
    assert len(kept) == 20 and kept.tolist() == sorted(set(kept.tolist()))
    ls = torch.linalg.solve(g[kept][:, kept], g[kept] @ ff.down.double().T).T
    torch.testing.assert_close(down.double(), ls, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("glu,act", LAYOUTS)
def test_obs_error_is_at_most_activation_pruning_with_refit(glu: bool, act: str) -> None:
    """At the same width OBS leaves no more output error than activation-aware pruning followed by
    the least-squares refit (both are exact fits of their kept set; OBS chooses by the error left
    after the fit), and one-at-a-time greedy no more than a coarse batch."""
    ff, x = random_ff(glu, act, seed=4), tokens(512, seed=5)
    g = _gram(ff, x)
    k = 24
    act_kept = kept_neurons(activation_scores(ff, ff.hidden(x).square().mean(0)), k)
    act_fit = torch.linalg.solve(g[act_kept][:, act_kept], g[act_kept] @ ff.down.double().T).T
    e_act = gram_sse(ff.down, g, act_kept, act_fit)
    kept1, d1 = obs_prune(ff.down, g, k, lam=1e-12, steps=I - k)
    kept3, d3 = obs_prune(ff.down, g, k, lam=1e-12, steps=3)
    e1, e3 = gram_sse(ff.down, g, kept1, d1), gram_sse(ff.down, g, kept3, d3)
    assert e1 <= e_act * (1 + 1e-6)
    assert e1 <= e3 * (1 + 1e-6)
    # The error from the statistics is the error on the tokens.
    pruned = replace(ff.select(kept1), down=d1.double())
    assert abs(sse(pruned, ff, x) - e1) <= 1e-6 * max(e1, 1.0) + (0 if ff.b_down is None else 1e-6 * e1)


def test_obs_rejects_bad_inputs() -> None:
    ff = random_ff(True, "silu")
    g = _gram(ff, tokens(64))
    with pytest.raises(ValueError, match="k must be"):
        obs_prune(ff.down, g, 0)
    with pytest.raises(ValueError, match="gram must be"):
        obs_prune(ff.down, g[:-1, :-1], 4)
    bad = g.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        obs_prune(ff.down, bad, 4)


def test_obs_leaves_less_error_than_activation_pruning_with_refit_on_smollm2(smollm2_shard, tmp_path) -> None:
    """Real SmolLM2-135M layers (early, middle, late) at the width the planner keeps for −20 % of
    parameters: structured OBS's output error on the calibration tokens is at most activation-aware
    pruning + the product's ridge refit (λ = 1e-3), each from collect's HᵀH."""
    from mlpfuse.stages import collect, data
    from mlpfuse.stages.data import corpus_key
    from mlpfuse.stages.model.features import moments, read_stats
    from mlpfuse.stages.model.runner import LayerStreamedModel

    dd = tmp_path / "data"
    data.run(data.TokenizeConfig(corpus="shakespeare", corpus_key=corpus_key("shakespeare"), block_size=256,
                                 calib_tokens=2048, eval_tokens=256), {"shard": smollm2_shard}, dd)
    cfg = collect.CollectConfig(features=("hidden",), inputs=False)
    collect.run_part(collect.CollectPartConfig(**cfg.model_dump(), worker=0), {"shard": smollm2_shard, "data": dd},
                     tmp_path / "p0")
    collect.run_merge(cfg, {"shard": smollm2_shard, "part0": tmp_path / "p0"}, tmp_path / "c")
    model = LayerStreamedModel(smollm2_shard)
    for i in (3, 14, 26):
        sd = model.layer_state(i)
        (ref,) = model.family.ff_blocks(model.config, sd)
        ff = model.family.read_ff(model.config, sd, ref).to(torch.float32)
        st = read_stats(tmp_path / "c", i)[ref.name]
        g = torch.from_numpy(st["hidden.gram"])
        k = 1017
        act = kept_neurons(activation_scores(ff, torch.from_numpy(moments(st)[2]).float()), k)
        acc = RefitAccumulator.from_gram(g, torch.from_numpy(st["hidden.sum"]), int(st["count"][0]), act, ff.down)
        e_act = gram_sse(ff.down, g, act, acc.solve(1e-3)[0])
        kept, down = obs_prune(ff.down, g, k)
        e_obs = gram_sse(ff.down, g, kept, down)
        assert e_obs <= e_act, (i, e_obs, e_act)


@pytest.mark.parametrize("bias", [False, True])
def test_accumulator_select_equals_the_pruned_blocks_statistics(bias: bool) -> None:
    """Slicing the whole block's statistics gives exactly what the pruned block's would be."""
    from mlpfuse.stages.math.refit import RefitAccumulator

    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 10, generator=g, dtype=torch.float64)
    down, b_down = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    gram, hsum = h.T @ h, h.sum(0)
    kept = torch.tensor([1, 4, 5, 8])
    args = (gram, hsum, 200)
    full = RefitAccumulator.from_gram(*args, torch.arange(10), down, b_down, bias=bias)
    direct = RefitAccumulator.from_gram(*args, kept, down, b_down, bias=bias)
    sel = full.select(kept)
    assert torch.equal(sel.hth, direct.hth) and torch.equal(sel.hty, direct.hty)
    assert (sel.yty, sel.n, sel.k_hidden, sel.bias) == (direct.yty, direct.n, direct.k_hidden, direct.bias)
