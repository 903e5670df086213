"""Whole-block refit (``refit: {mode: block}``): every weight of a compressed block fitted to the
original block's output from the ridge's solution, keeping the better of the start and the fit on
rows it never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlpfuse.stages import compress, shard
from mlpfuse.stages.compress import CompressConfig
from mlpfuse.stages.math.blockfit import fit_block
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.math.pruning import activation_scores, kept_neurons
from mlpfuse.stages.math.refit import RefitAccumulator, refit_down
from tests.test_collect import _collect, _data


def _teacher(glu: bool, seed: int = 0, hidden: int = 12, inter: int = 48) -> FFWeights:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    if glu:
        return FFWeights(up=r(inter, hidden), gate=r(inter, hidden), down=r(hidden, inter), act="silu")
    return FFWeights(up=r(inter, hidden), down=r(hidden, inter), act="gelu", b_up=0.1 * torch.randn(inter, generator=g),
                     b_down=0.1 * torch.randn(hidden, generator=g))


def _inputs(n: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g) * torch.linspace(0.3, 2.0, hidden)  # anisotropic, as real inputs


def _ridge_start(teacher: FFWeights, x: torch.Tensor, k: int) -> FFWeights:
    """Activation-aware pruning to k neurons, then the down-only ridge: the block mode's start."""
    with torch.no_grad():
        pruned = teacher.select(kept_neurons(activation_scores(teacher, (teacher.hidden(x) ** 2).mean(0)), k))
        acc = RefitAccumulator(k, teacher.hidden_size, bias=teacher.b_down is not None)
        acc.update(pruned.hidden(x), teacher.forward(x))
    return refit_down(pruned, acc, 1e-3)


def _err(ff: FFWeights, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((ff.forward(x) - y) ** 2).sum() / (y**2).sum())


@pytest.mark.parametrize("glu", [True, False])
def test_block_fit_beats_the_down_only_ridge_on_tokens_it_never_saw(glu: bool) -> None:
    teacher = _teacher(glu)
    x, x_new = _inputs(3000, 12, seed=1), _inputs(3000, 12, seed=2)
    with torch.no_grad():
        y, y_new = teacher.forward(x), teacher.forward(x_new)
    start = _ridge_start(teacher, x, 16)
    fitted, info = fit_block(start, x, y, steps=300, lr=3e-3, batch=256, held=300, lam=1e-3)
    assert info.kept_fit and info.error < info.start_error
    assert _err(fitted, x_new, y_new) < 0.9 * _err(start, x_new, y_new)  # fresh tokens: the fit generalises
    assert (fitted.b_up is None) == glu and (fitted.b_down is None) == glu  # every weight the block has, no more
    assert fitted.up.shape == start.up.shape and fitted.down.shape == start.down.shape


def test_block_fit_that_only_makes_things_worse_returns_the_start_unchanged() -> None:
    teacher = _teacher(True, seed=3)
    x = _inputs(1000, 12, seed=4)
    with torch.no_grad():
        y = teacher.forward(x)
    start = _ridge_start(teacher, x, 16)
    fitted, info = fit_block(start, x, y, steps=40, lr=50.0, batch=128, held=100, lam=1e-3)  # diverges
    assert not info.kept_fit and info.error == info.start_error
    for name in ("up", "gate", "down"):
        assert torch.equal(getattr(fitted, name), getattr(start, name))
    same, info0 = fit_block(start, x, y, steps=0, lr=1e-3, batch=128, held=100, lam=1e-3)
    assert same is start and info0.steps == 0


def test_block_fit_keeps_the_stored_precision_and_a_full_width_block_stays_exact() -> None:
    teacher = _teacher(True, seed=5)
    x = _inputs(800, 12, seed=6)
    with torch.no_grad():
        y = teacher.forward(x)
    # Nothing removed: the start is the teacher itself (zero error), so no fit can do better.
    fitted, info = fit_block(teacher, x, y, steps=30, lr=1e-3, batch=128, held=80, lam=0.0)
    assert info.start_error < 1e-10 and _err(fitted, x, y) < 1e-10
    start = _ridge_start(teacher, x, 16).to(torch.bfloat16)
    fitted, _ = fit_block(start, x, y, steps=100, lr=3e-3, batch=128, held=80, lam=1e-3)
    assert fitted.up.dtype == fitted.down.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def arts(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blockrefit")
    sd = root / "shard"
    shard.run(shard.ShardConfig(model=str(tiny_checkpoints["llama"])), {}, sd)
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    data = _data(root, n_blocks=64, block=16, vocab=vocab)
    return {"shard": sd, "data": data, "collect": _collect(sd, data, root / "c", workers=1)}


def _build(arts: dict[str, Path], out: Path, refit: dict, method: dict | None = None) -> dict:
    out.mkdir()
    cfg = CompressConfig.model_validate({"candidate": method or {"method": "prune", "criterion": "activation",
                                                                  "ratio": 0.5}, "refit": refit})
    return compress.run(cfg, {"shard": arts["shard"], "collect": arts["collect"], "data": arts["data"]}, out)


def _patch(out: Path, layer: int) -> dict[str, torch.Tensor]:
    meta = json.loads((out / "overlay.json").read_text())
    return load_file(str(out / meta["layers"][str(layer)]["patch"]))


@pytest.mark.parametrize("sequential", [False, True])
def test_block_refit_candidate_keeps_each_block_or_fits_it_whole(arts: dict[str, Path], tmp_path: Path,
                                                                sequential: bool) -> None:
    """Each changed block of a block-refit candidate is either the down-only candidate's block
    (the fit was not kept) or differs in its features too; the fit is kept somewhere."""
    down = _build(arts, tmp_path / "down", {"sequential": sequential})
    block = _build(arts, tmp_path / "block", {"mode": "block", "steps": 60, "lr": 3e-3, "batch": 64,
                                              "sequential": sequential})
    assert block["changed_layers"] == down["changed_layers"]
    refitted = 0
    for layer in down["changed_layers"]:
        a, b = _patch(tmp_path / "down", layer), _patch(tmp_path / "block", layer)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        features = [k for k in a if "up_proj" in k or "gate_proj" in k]
        if all(torch.equal(a[k], b[k]) for k in features):
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            refitted += 1
    assert refitted > 0


def test_block_refit_fits_a_tied_window_once_for_all_its_layers(arts: dict[str, Path], tmp_path: Path) -> None:
    res = _build(arts, tmp_path / "m", {"mode": "block", "steps": 30, "lr": 1e-2, "batch": 64},
                 {"method": "merge", "start": 0, "size": 2})
    assert res["refit_errors"]["layers"] == [0, 1]
    # One fit for the shared weights against both layers' outputs: each layer ends closer to its
    # original than the plain average of the two left it.
    assert all(a < b for a, b in zip(res["refit_errors"]["after"], res["refit_errors"]["before"], strict=True))
