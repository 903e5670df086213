"""Invariants of the MLPMoE math (stages/math/moefy.py): exact slicing, structured fade, compensated
pruning and export to a plain MLP."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.moefy import (
    StaticMoE,
    branch_assignment,
    branch_energy,
    compensated_prune,
    fade_schedule,
    fractal_fade,
    neuron_importance,
    output_energy_proxy,
    to_dense,
)

H, I = 32, 96


def make_ff(glu: bool, bias: bool, seed: int = 0) -> FFWeights:
    g = torch.Generator().manual_seed(seed)
    # Per-neuron scales spread over two orders of magnitude so importance is not a coin toss.
    scale = torch.logspace(-1, 1, I)[torch.randperm(I, generator=g)]
    return FFWeights(
        up=torch.randn(I, H, generator=g) / H**0.5,
        down=torch.randn(H, I, generator=g) * scale / I**0.5,
        act="silu" if glu else "gelu",
        gate=torch.randn(I, H, generator=g) / H**0.5 if glu else None,
        b_up=torch.randn(I, generator=g) * 0.1 if bias else None,
        b_down=torch.randn(H, generator=g) if bias else None,
    )


def inputs(n: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("method", ["contiguous", "importance"])
@pytest.mark.parametrize("num_branches", [1, 5, 7, 96])
def test_branches_cover_every_neuron_once(method: str, num_branches: int) -> None:
    ff = make_ff(True, True)
    idx = branch_assignment(ff, num_branches, method)  # type: ignore[arg-type]
    assert len(idx) == num_branches
    sizes = [len(i) for i in idx]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(torch.cat(idx).tolist()) == list(range(I))
    if method == "contiguous":
        assert torch.cat(idx).tolist() == list(range(I))


def test_importance_branches_are_contiguous_bands() -> None:
    ff = make_ff(True, True)
    score = neuron_importance(ff)
    idx = branch_assignment(ff, 6, "importance")
    for hi, lo in itertools.pairwise(idx):
        assert score[hi].min() >= score[lo].max()


def test_branch_assignment_rejects_bad_input() -> None:
    ff = make_ff(False, False)
    for bad in (0, I + 1, 2.0, True):
        with pytest.raises(ValueError, match=r"num_branches must be an integer in \[1, 96\]"):
            branch_assignment(ff, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown branch method 'random'"):
        branch_assignment(ff, 4, "random")  # type: ignore[arg-type]


@pytest.mark.parametrize("glu,bias", CASES)
@pytest.mark.parametrize("method", ["contiguous", "importance"])
def test_unpruned_moe_equals_dense(glu: bool, bias: bool, method: str) -> None:
    ff = make_ff(glu, bias)
    x = inputs()
    moe = StaticMoE.from_dense(ff, 8, method)  # type: ignore[arg-type]
    assert moe.intermediate_size == I and moe.num_branches == 8
    with torch.no_grad():
        assert rel_err(moe(x), ff.forward(x)) <= 1e-5
    # Export of the unpruned MoE is the original MLP, tensor for tensor.
    dense = to_dense(moe)
    for name in ("up", "down", "gate", "b_up", "b_down"):
        a, b = getattr(dense, name), getattr(ff, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@pytest.mark.parametrize("glu,bias", CASES)
def test_to_dense_equals_moe_after_pruning(glu: bool, bias: bool) -> None:
    ff = make_ff(glu, bias, seed=2)
    x = inputs()
    moe = StaticMoE.from_dense(ff, 8, "contiguous")
    faded = fractal_fade(moe, 0.3, "geometric")
    pruned = compensated_prune(faded, 5)
    for m in (faded, pruned, compensated_prune(moe, 0.5, compensate=False)):
        dense = to_dense(m)
        assert dense.intermediate_size == m.intermediate_size < I
        assert (dense.b_down is None) == (not bias)
        with torch.no_grad():
            assert rel_err(dense.forward(x), m(x)) <= 1e-5


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("moment", ["none", "diag", "full"])
def test_compensation_preserves_the_energy_proxy(glu: bool, moment: str) -> None:
    ff = make_ff(glu, True, seed=3)
    moe = StaticMoE.from_dense(ff, 10, "contiguous")
    m = None
    if moment != "none":
        h = ff.hidden(inputs(512)).double()
        second = h.T @ h / h.shape[0]
        m = second.diagonal().clone() if moment == "diag" else second
    before = output_energy_proxy(moe, m)
    for keep in (1, 4, 0.7, 10):
        pruned = compensated_prune(moe, keep, hidden_second_moment=m)
        assert output_energy_proxy(pruned, m) == pytest.approx(before, rel=1e-6)
        plain = compensated_prune(moe, keep, compensate=False, hidden_second_moment=m)
        assert torch.equal(plain.alpha, torch.ones(plain.num_branches))
        assert output_energy_proxy(plain, m) <= before * (1 + 1e-12)
    # The kept branches are the ones with the largest energy.
    energy = branch_energy(moe, m)
    kept = compensated_prune(moe, 3, hidden_second_moment=m)
    branch_of_first = {int(moe.branch_index(b)[0]): b for b in range(moe.num_branches)}
    kept_ids = sorted(branch_of_first[int(kept.branch_index(b)[0])] for b in range(3))
    assert kept_ids == sorted(torch.topk(energy, 3).indices.tolist())


def test_full_second_moment_gives_the_exact_branch_energy() -> None:
    ff = make_ff(True, True, seed=4)
    moe = StaticMoE.from_dense(ff, 6, "importance")
    x = inputs(256).double()
    ff64 = ff.to(torch.float64)
    h = ff64.hidden(x)
    energy = branch_energy(moe, h.T @ h / h.shape[0])
    for b in range(moe.num_branches):
        idx = moe.branch_index(b)
        y_b = h[:, idx] @ ff64.down[:, idx].T
        assert float(energy[b]) == pytest.approx(float(y_b.square().sum(1).mean()), rel=1e-9)


def test_fractal_fade_removes_more_from_weaker_branches() -> None:
    ff = make_ff(True, True, seed=5)
    moe = StaticMoE.from_dense(ff, 8, "importance")
    faded = fractal_fade(moe, 0.25, "linear", ratio=6.0)
    assert faded.intermediate_size == I - round(0.25 * I)
    # importance bands: branch 0 is the strongest; survivors per band must not increase.
    kept_per_band = [0] * 8
    bands = branch_assignment(ff, 8, "importance")
    band_of = {int(i): k for k, band in enumerate(bands) for i in band}
    for b in range(faded.num_branches):
        for i in faded.branch_index(b).tolist():
            kept_per_band[band_of[i]] += 1
    assert all(a >= b for a, b in itertools.pairwise(kept_per_band)), kept_per_band
    assert kept_per_band[0] > kept_per_band[-1]  # actually differential, not uniform
    # Within a branch the lowest-importance neurons go first.
    score = neuron_importance(ff)
    for b in range(faded.num_branches):
        kept = set(faded.branch_index(b).tolist())
        dropped = [i for i in bands[b].tolist() if i not in kept]
        if dropped and kept:
            assert score[dropped].max() <= score[list(kept)].min()
    assert torch.equal(fractal_fade(moe, 0.0).branch_index(3), moe.branch_index(3))


@pytest.mark.parametrize("schedule", ["uniform", "linear", "geometric"])
@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.6])
def test_fade_schedule_meets_the_overall_sparsity(schedule: str, sparsity: float) -> None:
    sizes = [13, 13, 12, 12, 12, 12, 12]
    for cap in (1.0, 0.8):
        counts = fade_schedule(
            sizes,
            sparsity,
            schedule,  # type: ignore[arg-type]
            ratio=5.0,
            max_branch_sparsity=cap,
        )
        assert sum(counts) == math.ceil(sparsity * sum(sizes) - 1e-9)
        assert all(0 <= c <= int(cap * n + 1e-9) for c, n in zip(counts, sizes))
        frac = np.array(counts) / np.array(sizes)
        assert (np.diff(frac) >= -1.0 / 12 - 1e-12).all(), (
            frac
        )  # monotone up to one neuron of rounding
    with pytest.raises(ValueError, match="allows at most"):
        fade_schedule(sizes, 0.9, schedule, max_branch_sparsity=0.5)  # type: ignore[arg-type]


def test_fade_and_prune_reject_bad_input() -> None:
    moe = StaticMoE.from_dense(make_ff(False, True), 4)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        fractal_fade(moe, 1.0)
    with pytest.raises(ValueError, match="unknown fade schedule 'cosine'"):
        fractal_fade(moe, 0.2, "cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"keep=0 branches is outside \[1, 4\]"):
        compensated_prune(moe, 0)
    with pytest.raises(TypeError, match="keep must be an int"):
        compensated_prune(moe, True)
    with pytest.raises(ValueError, match=r"keep=1.5 as a fraction"):
        compensated_prune(moe, 1.5)
    with pytest.raises(ValueError, match=r"hidden_second_moment must be"):
        compensated_prune(moe, 2, hidden_second_moment=torch.ones(3))
    ff = make_ff(False, True)
    with pytest.raises(ValueError, match="carries b_down"):
        StaticMoE([ff], [torch.arange(I)], ff.b_down, I)
