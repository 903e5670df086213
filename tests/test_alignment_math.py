"""Invariants of the FF merging math (stages/math/alignment.py): streamed correlation, LAP, permutation,
merging and CKA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpfuse.stages.math.alignment import (
    CorrelationAccumulator,
    align_window,
    merge_window,
    permute_ff,
)
from mlpfuse.stages.math.assignment import assignment_total, solve_assignment
from mlpfuse.stages.math.cka import cka, gram_products, normalized_gram
from mlpfuse.stages.math.ffweights import FFWeights

H, I = 24, 48


def make_ff(glu: bool, bias: bool, seed: int = 0, h: int = H, i: int = I) -> FFWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return FFWeights(
        up=r(i, h) / h**0.5,
        down=r(h, i) / i**0.5,
        act="silu" if glu else "gelu",
        gate=r(i, h) / h**0.5 if glu else None,
        b_up=r(i) * 0.1 if bias else None,
        b_down=r(h) * 0.1 if bias else None,
    )


def pre_activation(ff: FFWeights, x: torch.Tensor) -> torch.Tensor:
    """The paper's alignment features: the first FF linear's output, before the activation."""
    return torch.nn.functional.linear(x, ff.up, ff.b_up)


def assert_ff_equal(a: FFWeights, b: FFWeights, atol: float = 0.0) -> None:
    for name in ("up", "down", "gate", "b_up", "b_down"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            torch.testing.assert_close(ta, tb, atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------ streamed correlation


def test_streamed_correlation_equals_corrcoef() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1000, 8))
    # Shared latent structure plus a large common offset: the offset is what breaks the naive
    # raw-moment formula, the latent what makes correlations non-trivial.
    a = z @ rng.standard_normal((8, 20)) + rng.standard_normal((1000, 20)) + 1e3
    b = z @ rng.standard_normal((8, 30)) + 0.5 * rng.standard_normal((1000, 30)) - 5e2
    expected = np.corrcoef(a, b, rowvar=False)[:20, 20:]
    acc = CorrelationAccumulator(20, 30)
    for start, stop in [(0, 1), (1, 8), (8, 308), (308, 1000)]:  # uneven blocks, a 1-row block
        acc.update(a[start:stop], torch.from_numpy(b[start:stop]))
    assert acc.n_rows == 1000
    np.testing.assert_allclose(acc.corr(), expected, atol=1e-10, rtol=0)

    # Two accumulators over disjoint rows merge to the same statistics (parallel collect).
    left, right = CorrelationAccumulator(20, 30), CorrelationAccumulator(20, 30)
    left.update(a[:400], b[:400])
    right.update(a[400:], b[400:])
    left.merge(right)
    np.testing.assert_allclose(left.corr(), expected, atol=1e-10, rtol=0)

    # float32 block products stay accurate because blocks are centred first.
    acc32 = CorrelationAccumulator(20, 30, compute_dtype=torch.float32)
    for start in range(0, 1000, 128):
        acc32.update(
            a[start : start + 128].astype(np.float32), b[start : start + 128].astype(np.float32)
        )
    np.testing.assert_allclose(acc32.corr(), expected, atol=1e-5, rtol=0)

    restored = CorrelationAccumulator.from_state_dict(acc.state_dict())
    np.testing.assert_array_equal(restored.corr(), acc.corr())
    # The sums are updated in place: a state taken earlier is a snapshot, and an accumulator
    # restored from it does not write into it.
    state = acc.state_dict()
    snapshot = {k: np.copy(v) for k, v in state.items()}
    acc.update(a[:100], b[:100])
    CorrelationAccumulator.from_state_dict(state).update(a[:100], b[:100])
    for k, v in state.items():
        np.testing.assert_array_equal(v, snapshot[k])


def test_constant_neurons_get_zero_correlation() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 5)).astype(np.float32)
    b = rng.standard_normal((200, 4)).astype(np.float32)
    a[:, 2] = 0.3  # a dead / constant neuron
    b[:, 0] = 0.0
    acc = CorrelationAccumulator(5, 4)
    for start in range(0, 200, 64):
        acc.update(a[start : start + 64], b[start : start + 64])
    r = acc.corr()
    assert np.isfinite(r).all()
    assert (r[2] == 0).all() and (r[:, 0] == 0).all()
    with np.errstate(
        invalid="ignore"
    ):  # np.corrcoef divides by the zero std (NaN) — the case we fix
        live = np.corrcoef(a, b, rowvar=False)[:5, 5:]
    np.testing.assert_allclose(
        np.delete(np.delete(r, 2, 0), 0, 1), np.delete(np.delete(live, 2, 0), 0, 1), atol=1e-9
    )


def test_accumulator_rejects_bad_blocks() -> None:
    acc = CorrelationAccumulator(3, 4)
    with pytest.raises(ValueError, match="same token rows"):
        acc.update(np.zeros((5, 3)), np.zeros((6, 4)))
    with pytest.raises(ValueError, match="n_a=3"):
        acc.update(np.zeros((5, 2)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        acc.corr()


# ------------------------------------------------------------------ permutation and merging


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_permuting_neurons_leaves_output_unchanged(glu: bool, bias: bool) -> None:
    ff = make_ff(glu, bias, seed=3)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(4))
    for seed in range(3):
        perm = torch.randperm(I, generator=torch.Generator().manual_seed(seed))
        out = permute_ff(ff, perm).forward(x)
        torch.testing.assert_close(out, ff.forward(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_ff(ff, np.zeros(I, dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \[48\]"):
        permute_ff(ff, np.arange(I - 1))


@pytest.mark.parametrize("glu", [True, False])
def test_alignment_recovers_a_permuted_copy(glu: bool) -> None:
    ff = make_ff(glu, bias=True, seed=5)
    hidden_perm = torch.randperm(I, generator=torch.Generator().manual_seed(6))
    shuffled = permute_ff(ff, hidden_perm)
    x = torch.randn(2000, H, generator=torch.Generator().manual_seed(7))
    f_anchor, f_other = pre_activation(ff, x), pre_activation(shuffled, x)

    result = align_window([f_anchor, f_other], anchor_index=0, block_rows=300)
    np.testing.assert_array_equal(result.perms[0], np.arange(I))
    assert permute_ff(shuffled, result.perms[1]).up.equal(ff.up)
    assert result.matched_corr[1] == pytest.approx(1.0, abs=1e-9)
    assert result.identity_corr[1] < 0.5  # a random permutation lines up almost nothing
    assert result.n_rows == 2000
    # Merging the anchor with its re-aligned copy gives the original weights back.
    assert_ff_equal(merge_window([ff, shuffled], result.perms), ff)

    # Callable sources with different block sizes, anchor last: the same answer.
    def blocks(f: torch.Tensor, step: int):
        return lambda: (f[s : s + step].numpy() for s in range(0, f.shape[0], step))

    lazy = align_window(
        [blocks(f_other, 333), blocks(f_anchor, 500)], anchor_index=1, solver="scipy"
    )
    np.testing.assert_array_equal(lazy.perms[1], np.arange(I))
    assert_ff_equal(permute_ff(shuffled, lazy.perms[0]), ff)


def test_align_window_rejects_mismatched_rows() -> None:
    a, b = np.random.default_rng(0).standard_normal((2, 100, 6))
    with pytest.raises(ValueError, match="different numbers of token rows"):
        align_window([a, b[:90]])
    with pytest.raises(ValueError, match="anchor_index=2"):
        align_window([a, b], anchor_index=2)
    with pytest.raises(ValueError, match="equal widths"):
        align_window([a, b[:, :5]])


def test_merge_window_weights_and_vanilla() -> None:
    a, b = make_ff(True, True, seed=1), make_ff(True, True, seed=2)
    merged = merge_window([a, b], [None, None], weights=[3.0, 1.0])
    torch.testing.assert_close(merged.up, 0.75 * a.up + 0.25 * b.up)
    assert a.b_down is not None and b.b_down is not None
    torch.testing.assert_close(merged.b_down, 0.75 * a.b_down + 0.25 * b.b_down)
    perm = np.random.default_rng(0).permutation(I)
    merged = merge_window([a, b], [None, perm])
    pb = permute_ff(b, perm)
    torch.testing.assert_close(merged.gate, (a.gate + pb.gate) / 2)  # type: ignore[operator]
    torch.testing.assert_close(merged.down, (a.down + pb.down) / 2)
    bf16 = merge_window([a.to(torch.bfloat16), b.to(torch.bfloat16)], [None, None])
    assert bf16.up.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="equal shapes"):
        merge_window([a, make_ff(True, True, i=I + 1)], [None, None])
    with pytest.raises(ValueError, match="disagree on having gate"):
        merge_window(
            [a, FFWeights(up=a.up, down=a.down, act=a.act, b_up=a.b_up, b_down=a.b_down)],
            [None, None],
        )
    with pytest.raises(ValueError, match="activation 'gelu'"):
        merge_window([a, make_ff(False, True)], [None, None])
    with pytest.raises(ValueError, match="weights must be"):
        merge_window([a, b], [None, None], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 FF blocks"):
        merge_window([a, b], [None])


# ------------------------------------------------------------------ LAP solvers


def structured_corr(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low_rank = rng.standard_normal((n, 4)) @ rng.standard_normal((4, n)) * 0.05
    planted = np.zeros((n, n))
    planted[np.arange(n), rng.permutation(n)] = rng.uniform(0.1, 0.9, n)
    return np.clip(planted + low_rank + 0.02 * rng.standard_normal((n, n)), -1, 1)


@pytest.mark.parametrize("n", [1, 2, 17, 300])
@pytest.mark.parametrize("maximize", [True, False])
def test_lap_and_scipy_reach_the_same_optimum(n: int, maximize: bool) -> None:
    for corr in (structured_corr(n, n), np.random.default_rng(n).uniform(-1, 1, (n, n))):
        p_lap = solve_assignment(corr, maximize, solver="lap")
        p_scipy = solve_assignment(corr, maximize, solver="scipy")
        p_auto = solve_assignment(torch.from_numpy(corr), maximize)
        for p in (p_lap, p_scipy, p_auto):
            assert sorted(p.tolist()) == list(range(n))
        t = assignment_total(corr, p_scipy)
        assert assignment_total(corr, p_lap) == pytest.approx(t, rel=1e-12, abs=1e-12)
        assert assignment_total(corr, p_auto) == pytest.approx(t, rel=1e-12, abs=1e-12)


def test_lap_handles_ties() -> None:
    corr = np.random.default_rng(0).integers(0, 3, (60, 60)).astype(np.float64)
    corr[:10] = 0.0  # dead neurons: whole rows of zeros, like CorrelationAccumulator gives
    t = assignment_total(corr, solve_assignment(corr, solver="scipy"))
    assert assignment_total(corr, solve_assignment(corr, solver="lap")) == t


def test_solve_assignment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        solve_assignment(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        solve_assignment(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown solver 'hungarian'"):
        solve_assignment(np.eye(3), solver="hungarian")  # type: ignore[arg-type]
    assert solve_assignment(np.zeros((0, 0))).shape == (0,)


# ------------------------------------------------------------------ CKA


def test_cka_invariances_and_heat_map() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16))
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    assert cka(x, x) == pytest.approx(1.0)
    assert cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # orthogonal + isotropic scale + shift
    y = x[:, :8] @ rng.standard_normal((8, 10)) + rng.standard_normal((400, 10))
    value = cka(x, y)
    assert 0.0 < value < 1.0
    # The feature-Gram form (d×d) of the same quantity, in float64.
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.square(yc.T @ xc).sum() / np.sqrt(np.square(xc.T @ xc).sum() * np.square(yc.T @ yc).sum())
    assert value == pytest.approx(feature_form, abs=1e-12)
    # The heat-map's pairwise products (float32 Grams, as the similarity stage keeps them) agree.
    grams = torch.stack([normalized_gram(f)[0].reshape(-1).float() for f in (x, y, x[:, ::-1])])
    m = gram_products(grams)
    assert m[0, 1] == pytest.approx(value, abs=1e-6) and m[0, 2] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    assert cka(x, np.ones((400, 3))) == 0.0
    assert normalized_gram(np.ones((400, 3)))[1] is False
    with pytest.raises(ValueError, match="same rows"):
        cka(x, y[:10])
