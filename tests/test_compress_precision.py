"""compress on a bfloat16 checkpoint: compressed blocks are kept, refit and written in the stored
precision (one block upcast at a time), so what a stage measures is what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlpfuse.stages import compress, shard
from mlpfuse.stages.compress import CompressConfig
from mlpfuse.stages.math import alignment
from mlpfuse.stages.math.assignment import solve_assignment
from mlpfuse.stages.math.ffweights import FFWeights
from mlpfuse.stages.model.features import read_stats
from tests.test_collect import _collect, _data


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def bf16(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"bf16-{request.param}")
    AutoModelForCausalLM.from_pretrained(tiny_checkpoints[request.param], dtype=torch.bfloat16).save_pretrained(root / "ckpt")
    sd = root / "shard"
    shard.run(shard.ShardConfig(model=str(root / "ckpt")), {}, sd)
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    data = _data(root, n_blocks=6, block=16, vocab=vocab)
    return {"shard": sd, "data": data, "collect": _collect(sd, data, root / "c", workers=1)}


def _run(arts: dict[str, Path], out: Path, method: dict, refit: dict | None, **inputs: Path) -> dict:
    out.mkdir()
    cfg = CompressConfig.model_validate({"candidate": method, "refit": refit})
    return compress.run(cfg, {"shard": arts["shard"], "collect": arts["collect"], "data": arts["data"], **inputs}, out)


PRUNE = {"method": "prune", "criterion": "activation", "ratio": 0.5}


def _patches(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    meta = json.loads((out / "overlay.json").read_text())
    return {i: load_file(str(out / e["patch"])) for i, e in meta["layers"].items() if not e.get("skip")}


PRUNE = {"method": "prune", "criterion": "activation", "ratio": 0.5}


@pytest.mark.parametrize("method", [PRUNE, {"method": "fusion", "ratio": 0.5, "iters": 3}], ids=["prune", "fusion"])
def test_refit_in_stored_precision_equals_its_twin_bit_for_bit(bf16: dict[str, Path], tmp_path: Path,
                                                              method: dict) -> None:
    fresh = _run(bf16, tmp_path / "fresh", method, {})
    _run(bf16, tmp_path / "twin", method, None)
    reuse = _run(bf16, tmp_path / "reuse", method, {}, unrefit=tmp_path / "twin")
    # The twin's blocks are read back in bf16; a fresh build keeps its blocks in bf16 too, so
    # both fit the same numbers: identical weights and errors, not merely close ones (fused
    # centroids are not bf16 numbers: fitting float32 centroids would give other weights).
    assert reuse == fresh
    a, b = _patches(tmp_path / "fresh"), _patches(tmp_path / "reuse")
    assert a.keys() == b.keys() and a
    for i in a:
        assert a[i].keys() == b[i].keys()
        for k, t in a[i].items():
            assert t.dtype == torch.bfloat16, (i, k)
            assert torch.equal(t, b[i][k]), (i, k)
    errs = fresh["refit_errors"]
    assert all(after < before for before, after in zip(errs["before"], errs["after"], strict=True))


def test_moe_merge_and_prune_write_stored_precision(bf16: dict[str, Path], tmp_path: Path) -> None:
    merged = _run(bf16, tmp_path / "merge", {"method": "merge", "start": 0, "size": 2, "moe_tokens": 32}, None)
    assert merged["tied"] == [[0, 1]]
    pruned = _run(bf16, tmp_path / "prune", PRUNE, None)
    assert pruned["ff_params"] < merged["ff_params"]
    for out in ("merge", "prune"):
        for patch in _patches(tmp_path / out).values():
            assert {t.dtype for t in patch.values() if t.is_floating_point()} == {torch.bfloat16}


def test_merge_window_streams_blocks_and_matches_the_list_form() -> None:
    g = torch.Generator().manual_seed(0)

    def ff() -> FFWeights:
        return FFWeights(up=torch.randn(12, 5, generator=g), gate=torch.randn(12, 5, generator=g),
                         down=torch.randn(5, 12, generator=g), act="silu").to(torch.bfloat16)

    blocks = [ff() for _ in range(3)]
    perms = [None, np.random.default_rng(1).permutation(12), np.random.default_rng(2).permutation(12)]
    listed = alignment.merge_window(blocks, perms, weights=[1.0, 2.0, 3.0])
    seen: list[int] = []

    def lazily():
        for k, b in enumerate(blocks):
            seen.append(k)
            yield b

    streamed = alignment.merge_window(lazily(), perms, weights=[1.0, 2.0, 3.0])
    assert seen == [0, 1, 2] and streamed.up.dtype == torch.bfloat16
    for name in ("up", "gate", "down"):
        assert torch.equal(getattr(streamed, name), getattr(listed, name))
    # The average runs in float32: the same as averaging float32 copies, rounded once.
    ref = alignment.merge_window([b.to(torch.float32) for b in blocks], perms, weights=[1.0, 2.0, 3.0])
    assert torch.equal(streamed.down, ref.down.to(torch.bfloat16))
    with pytest.raises(ValueError, match="3 perms for 2 FF blocks"):
        alignment.merge_window(iter(blocks[:2]), perms)


def test_correlation_and_assignment_in_place_equal_the_copying_forms() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 40))
    b = a[:, rng.permutation(40)] + 0.3 * rng.standard_normal((300, 40))
    accs = []
    for _ in range(2):
        acc = alignment.CorrelationAccumulator(40, 40)
        for s in range(0, 300, 64):
            acc.update(a[s : s + 64], b[s : s + 64])
        accs.append(acc)
    copy = accs[0].corr()
    consumed = accs[1].corr(consume=True)
    np.testing.assert_array_equal(consumed, copy)
    assert accs[1].n_rows == 0  # given up: it starts over
    accs[1].update(a, b)
    np.testing.assert_allclose(accs[1].corr(), copy, rtol=1e-12, atol=1e-12)
    kept = consumed.copy()
    perm = solve_assignment(consumed, maximize=True, overwrite=True)
    assert np.array_equal(perm, solve_assignment(kept, maximize=True, solver="scipy"))
    np.testing.assert_allclose(consumed, kept, rtol=0, atol=1e-15)  # turned back into the correlation


MOEFY = {"method": "moefy", "branches": 4, "assignment": "activation", "op": "compensated", "keep_branches": 0.5}


@pytest.mark.parametrize("method", [PRUNE, MOEFY], ids=["prune", "moefy"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral"])
def test_pruned_refit_from_the_gram_equals_the_refit_from_tokens(
        model_type: str, method: dict, tiny_checkpoints: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit of a block that keeps some original neurons (pruned; MLPMoE's compensated
    branches), solved from collect's HᵀH with no token read, equals the one accumulated from the
    tokens: GLU and biased blocks, experts."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_checkpoints[model_type].iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(ckpt / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for k in [k for k in weights if k.endswith("mlp.c_fc.bias") or k.endswith("mlp.c_proj.bias")]:
        weights[k] = torch.randn(weights[k].shape, generator=g)  # initialised to zero: make them count
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(ckpt)), {}, sd)
    vocab = json.loads((sd / "config.json").read_text())["vocab_size"]
    data = _data(tmp_path, n_blocks=6, block=16, vocab=vocab)
    with_gram = {"shard": sd, "data": data, "collect": _collect(sd, data, tmp_path / "g", workers=2)}
    tokens = {"shard": sd, "data": data, "collect": _collect(sd, data, tmp_path / "t", workers=1, gram_max=0)}
    ref = _run(tokens, tmp_path / "tokens", method, {})

    def no_tokens(*_a: object, **_k: object) -> None:
        raise AssertionError("the gram refit read calibration tokens")

    monkeypatch.setattr(compress.BuildContext, "block_inputs", no_tokens)
    got = _run(with_gram, tmp_path / "gram", method, {})
    for key in ("before", "after"):
        np.testing.assert_allclose(got["refit_errors"][key], ref["refit_errors"][key], rtol=1e-4, atol=1e-7)
    a, b = _patches(tmp_path / "gram"), _patches(tmp_path / "tokens")
    assert a.keys() == b.keys() and a
    if model_type == "gpt2":
        # A GELU neuron that is nearly linear on these few tokens makes the fitted bias
        # ill-conditioned: float32-rounding differences in the sums move it by ~1 % while the fit
        # (the errors above) is the same. The weights are compared where the solve is well posed.
        return
    for i in a:
        for k, t in a[i].items():
            torch.testing.assert_close(t, b[i][k], rtol=1e-4, atol=1e-5)


def test_refit_leaves_an_expert_no_token_was_routed_to_as_pruned(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import TINY_CONFIGS

    # 8 experts, top-1, 4 calibration tokens: at least 4 experts see no token.
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", **{**TINY_CONFIGS["mixtral"], "num_local_experts": 8, "num_experts_per_tok": 1})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    sd = tmp_path / "shard"
    shard.run(shard.ShardConfig(model=str(tmp_path / "ckpt")), {}, sd)
    data = _data(tmp_path, n_blocks=1, block=4, vocab=128)
    for gram_max in (8192, 0):  # the gram path and the token path
        arts = {"shard": sd, "data": data, "collect": _collect(sd, data, tmp_path / f"c{gram_max}", workers=1,
                                                               gram_max=gram_max)}
        counts = [int(read_stats(arts["collect"], 0)[f"expert{e}"]["count"][0]) for e in range(8)]
        idle, busy = [e for e in range(8) if not counts[e]], [e for e in range(8) if counts[e]]
        assert idle and busy
        plain = _run(arts, tmp_path / f"plain{gram_max}", PRUNE, None)
        fit = _run(arts, tmp_path / f"fit{gram_max}", PRUNE, {})
        assert fit["params"] == plain["params"]
        a, b = _patches(tmp_path / f"plain{gram_max}"), _patches(tmp_path / f"fit{gram_max}")
        down = next(k for k in a["0"] if k.endswith("experts.down_proj"))
        assert torch.equal(a["0"][down][idle], b["0"][down][idle])  # no tokens: left as pruned
        assert not torch.equal(a["0"][down][busy], b["0"][down][busy])  # routed: refit
