"""Calibration on a weighted mix of corpora, evaluation on every held-out set (calibration kinds
and unseen kinds) and the comparison with the base model's next-token distribution."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mlpfuse.orchestrator.budget import add_set_sums, rank_score
from mlpfuse.stages import data, evaluate, shard
from mlpfuse.stages.data import TokenizeConfig, mix_key, read_calib, read_eval_sets
from mlpfuse.stages.evaluate import EvaluateConfig, kl_top1, set_windows


def _corpus(path: Path, word: str, docs: int = 6) -> Path:
    path.mkdir()
    for i in range(docs):
        (path / f"{word}{i}.txt").write_text(" ".join(f"{word}{j % 89} line {i}" for j in range(300)))
    return path


@pytest.fixture(scope="module")
def lm_shard(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evsets") / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_lm)), {}, out)
    return out


@pytest.fixture(scope="module")
def mixed(lm_shard: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenizeConfig]:
    root = tmp_path_factory.mktemp("mix")
    a, b, u = (_corpus(root / n, n) for n in ("alpha", "beta", "gamma"))
    cfg = TokenizeConfig(corpus=(str(a), str(b)), weights=(3, 1), unseen=(str(u),), block_size=32, calib_tokens=512,
                         eval_tokens=200)
    cfg = cfg.model_copy(update={"corpus_key": mix_key(cfg)})
    out = root / "data"
    data.run(cfg, {"shard": lm_shard}, out)
    return out, cfg


def test_the_mix_follows_the_weights_and_every_set_is_held_out(mixed: tuple[Path, TokenizeConfig], lm_shard: Path) -> None:
    out, cfg = mixed
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_shard)
    blocks = read_calib(out)
    assert blocks.shape == (16, 32)
    kinds = ["alpha" if "alpha" in tok.decode(b) else "beta" for b in blocks]
    assert kinds.count("alpha") == 12 and kinds.count("beta") == 4  # 3 : 1
    assert {"alpha", "beta"} <= set(kinds[:4])  # interleaved: the first blocks are a mix too
    assert not any("gamma" in tok.decode(b) for b in blocks)  # unseen: never in calibration
    sets = read_eval_sets(out)
    assert list(sets) == cfg.eval_sets() and all(sum(map(len, s)) == 200 for s in sets.values())
    split = json.loads((out / "split.json").read_text())["sets"]
    for name in cfg.corpora():
        assert not set(split[name]["eval_docs"]) & set(split[name]["calib_docs"])
    assert "calib_docs" not in split[cfg.unseen[0]]
    assert pq.read_table(out / "eval.parquet").column_names == ["set", "doc", "input_ids"]


def test_mix_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="weights"):
        TokenizeConfig(corpus=("a", "b"), weights=(1,))
    with pytest.raises(ValueError, match="once"):
        TokenizeConfig(corpus=("a", "b"), unseen=("a",))
    with pytest.raises(ValueError, match="weights"):
        TokenizeConfig(corpus=("a", "b"), weights=(1, 0))


def test_each_set_is_windowed_alone_and_smaller_budgets_are_prefixes() -> None:
    cfg = EvaluateConfig(window=16, stride=8)
    sets = {"a": [np.arange(100)], "b": [np.arange(40), np.arange(70)]}
    full = set_windows(sets, cfg, 0)
    small = set_windows(sets, cfg, 24)
    for name in sets:
        f = [w[2] for w in full if w[3] == name]
        sm = [w[2] for w in small if w[3] == name]
        assert f[: len(sm)] == sm and sum(w[1] for w in small if w[3] == name) >= 24
    rest = set_windows(sets, cfg, 0, after_tokens=24)
    assert sorted(w[2] for w in rest) == sorted(set(w[2] for w in full) - {w[2] for w in small})


def test_kl_over_the_base_top_k_is_exact_at_full_vocabulary_and_a_lower_bound_below() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(20, 50, generator=g) * 2, -1)
    cand = torch.log_softmax(torch.randn(20, 50, generator=g) * 2, -1)
    exact = float((base.exp() * (base - cand)).sum())
    top = base.topk(50, -1)
    kl, top1 = kl_top1(cand, top.indices, top.values)
    assert kl == pytest.approx(exact, rel=1e-5)
    assert top1 == int((cand.argmax(-1) == base.argmax(-1)).sum())
    for k in (1, 5, 20):
        t = base.topk(k, -1)
        assert 0 <= kl_top1(cand, t.indices, t.values)[0] <= exact + 1e-6
    t = base.topk(8, -1)
    assert kl_top1(base, t.indices, t.values) == (pytest.approx(0.0, abs=1e-6), 20)


def test_a_model_against_its_own_reference_has_ratio_one_kl_zero_full_agreement(
        mixed: tuple[Path, TokenizeConfig], lm_shard: Path, tmp_path: Path) -> None:
    out, cfg = mixed
    ev = EvaluateConfig(window=32, stride=16, top_k=8)
    base = evaluate.run(ev, {"shard": lm_shard, "data": out}, tmp_path / "base")
    assert (tmp_path / "base" / evaluate.REFERENCE).exists() and list(base["sets"]) == cfg.eval_sets()
    assert base["tokens"] == sum(s["tokens"] for s in base["sets"].values())
    again = evaluate.run(ev.model_copy(update={"max_tokens": 64}),
                         {"shard": lm_shard, "data": out, "reference": tmp_path / "base"}, tmp_path / "again")
    assert not (tmp_path / "again" / evaluate.REFERENCE).exists()
    sets = add_set_sums({}, again["sets"])
    for st in sets.values():
        assert st["tokens"] >= 64 and st["ratio"] == pytest.approx(1.0, abs=1e-6)
        assert st["kl"] == pytest.approx(0.0, abs=1e-6) and st["top1"] == 1.0
    assert rank_score({"perplexity": 9.0, "sets": sets}, "worst_ratio") == pytest.approx(1.0, abs=1e-6)


def test_rank_rules() -> None:
    r = {"perplexity": 7.0, "sets": {"a": {"ratio": 1.2}, "b": {"ratio": 2.0}}}
    assert rank_score(r, "worst_ratio") == 2.0
    assert rank_score(r, "mean_ratio") == pytest.approx(math.sqrt(2.4))
    assert rank_score(r, "perplexity") == 7.0
    assert rank_score({"perplexity": 3.0, "sets": {"a": {"tokens": 4}}}, "worst_ratio") == 3.0


def test_a_reference_over_other_windows_is_not_compared(mixed: tuple[Path, TokenizeConfig], lm_shard: Path,
                                                       tmp_path: Path) -> None:
    """A base evaluation that scored fewer tokens, or other windows, cannot give ratios for windows
    it never scored: the candidate's result then has no KL or ratio (never a mixed one)."""
    out, _ = mixed
    ev = EvaluateConfig(window=32, stride=16, top_k=4, max_tokens=48)
    evaluate.run(ev, {"shard": lm_shard, "data": out}, tmp_path / "base")
    for other in (ev.model_copy(update={"max_tokens": 0}), ev.model_copy(update={"stride": 8})):
        got = evaluate.run(other, {"shard": lm_shard, "data": out, "reference": tmp_path / "base"}, tmp_path / "x")
        assert "kl" not in got and all("base_nll_sum" not in s for s in got["sets"].values())
