"""Prefix sharing: a candidate scored from the base model's cached hidden states at its first
changed layer gets the perplexity of a full evaluation, with fewer layer-forwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlpfuse.stages import compress, data, evaluate, shard
from mlpfuse.stages.evaluate import EvaluateConfig, PrefixConfig
from tests.conftest import tiny_llama_with_tokenizer

LAYERS = 4


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix")
    model = tiny_llama_with_tokenizer(root / "model", smollm2_tokenizer, layers=LAYERS)
    out = {k: root / k for k in ("shard", "data", "overlay")}
    for p in out.values():
        p.mkdir()
    shard.run(shard.ShardConfig(model=str(model)), {}, out["shard"])
    data.run(data.TokenizeConfig(corpus="shakespeare", block_size=64, calib_tokens=256, eval_tokens=512),
             {"shard": out["shard"]}, out["data"])
    cfg = compress.CompressConfig.model_validate(
        {"candidate": {"method": "prune", "criterion": "magnitude", "ratio": 0.5, "layers": [2, 3]}})
    compress.run(cfg, {"shard": out["shard"]}, out["overlay"])
    return out


EV = EvaluateConfig(window=64, stride=32, batch_size=3)


def _prefix(arts: dict[str, Path], tmp: Path, layers: tuple[int, ...], ev: EvaluateConfig = EV) -> Path:
    out = tmp / f"prefix-{'-'.join(map(str, layers))}-{ev.window}"
    out.mkdir()
    evaluate.run_prefix(PrefixConfig(**ev.model_dump(), layers=layers), {"shard": arts["shard"], "data": arts["data"]}, out)
    return out


@pytest.mark.parametrize("max_tokens", [0, 100])
def test_prefix_start_equals_full_evaluation(arts: dict[str, Path], tmp_path: Path, max_tokens: int) -> None:
    prefix = _prefix(arts, tmp_path, (1, 2))
    ev = EV.model_copy(update={"max_tokens": max_tokens})
    inputs = {"shard": arts["shard"], "data": arts["data"], "overlay": arts["overlay"]}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = evaluate.run(ev, inputs, tmp_path / "a")
    shared = evaluate.run(ev, {**inputs, "prefix": prefix}, tmp_path / "b")
    assert full["start_layer"] == 0 and shared["start_layer"] == 2
    assert shared["tokens"] == full["tokens"] and shared["windows"] == full["windows"]
    assert shared["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert shared["layer_tokens"] * LAYERS == full["layer_tokens"] * (LAYERS - 2)


def test_prefix_of_other_windows_or_layers_is_not_used(arts: dict[str, Path], tmp_path: Path) -> None:
    inputs = {"shard": arts["shard"], "data": arts["data"], "overlay": arts["overlay"]}
    other_windows = _prefix(arts, tmp_path, (2,), EV.model_copy(update={"window": 32}))
    other_layer = _prefix(arts, tmp_path, (1,))
    too_few = _prefix(arts, tmp_path, (2,), EV.model_copy(update={"max_tokens": 40}))
    for i, prefix in enumerate((other_windows, other_layer, too_few)):
        (tmp_path / f"o{i}").mkdir()
        assert evaluate.run(EV, {**inputs, "prefix": prefix}, tmp_path / f"o{i}")["start_layer"] == 0


def test_prefix_resumes_committed_layers(arts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _prefix(arts, tmp_path, (1, 3))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "hidden").iterdir()}

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("a committed prefix layer was recomputed")

    monkeypatch.setattr(evaluate.LayerStreamedModel, "run", fail)
    evaluate.run_prefix(PrefixConfig(**EV.model_dump(), layers=(1, 3)), {"shard": arts["shard"], "data": arts["data"]}, out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "hidden").iterdir()} == before


def test_prefix_rejects_layers_out_of_range(arts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        _prefix(arts, tmp_path, (0,))
    with pytest.raises(ValueError, match="out of range"):
        _prefix(arts, tmp_path, (LAYERS,))


@pytest.mark.parametrize("shared", [False, True])
def test_increment_adds_up_to_the_larger_budget(arts: dict[str, Path], tmp_path: Path, shared: bool) -> None:
    """A halving round scores only the windows beyond the previous round's: its sums plus the
    previous round's give the larger budget's perplexity, for the larger budget's work minus the
    smaller one's (with or without the prefix start)."""
    import math

    inputs = {"shard": arts["shard"], "data": arts["data"], "overlay": arts["overlay"]}
    if shared:
        inputs["prefix"] = _prefix(arts, tmp_path, (2,))
    runs = {}
    for name, upd in {"small": {"max_tokens": 100}, "large": {"max_tokens": 300},
                      "inc": {"max_tokens": 300, "after_tokens": 100}, "rest": {"max_tokens": 0, "after_tokens": 300}}.items():
        (tmp_path / name).mkdir()
        runs[name] = evaluate.run(EV.model_copy(update=upd), inputs, tmp_path / name)
    small, large, inc = runs["small"], runs["large"], runs["inc"]
    assert inc["skipped_windows"] == small["windows"] and inc["windows"] == large["windows"] - small["windows"] > 0
    assert small["tokens"] + inc["tokens"] == large["tokens"]
    assert small["layer_tokens"] + inc["layer_tokens"] == large["layer_tokens"]
    ppl = math.exp((small["nll_sum"] + inc["nll_sum"]) / (small["tokens"] + inc["tokens"]))
    assert ppl == pytest.approx(large["perplexity"], rel=1e-5)
    assert inc["start_layer"] == (2 if shared else 0)
    assert runs["rest"]["tokens"] > 0  # the last round (max_tokens 0: everything) scores what is left
