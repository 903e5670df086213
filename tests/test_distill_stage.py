"""The distill stage: teacher export (original) + student export (compressed winner, one layer
dropped, FF pruned, a tied window) + calibration blocks -> a distilled Hugging Face checkpoint.

Covers the layer map (student layer j against the teacher layer it came from), the loss going
down, resume after an interrupted attempt (bit-identical to an uninterrupted run), the time cap,
the tied form, and the guards that keep the teacher the original model. Tiny random Llama; run
with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import mlpfuse
import mlpfuse.stages.model.trainer as trainer_mod
from mlpfuse.core.errors import InputError
from mlpfuse.stages import export, shard
from mlpfuse.stages.distill import CHECKPOINTS_DIR, DistillStageConfig, run_stage
from mlpfuse.stages.math.distill_loss import layer_map_for, layer_mse
from mlpfuse.stages.model.families import family_for
from mlpfuse.stages.model.hf import TIES_FILE
from mlpfuse.stages.model.overlay import Overlay, save_overlay
from mlpfuse.stages.model.shards import layer_file
from mlpfuse.stages.model.trainer import DistillConfig, distill
from tests.conftest import TINY_CONFIGS

N_LAYERS = 4
SKIP, TIE = 1, [2, 3]  # base layer 1 dropped; base layers 2, 3 share one pruned FF set
LAYER_MAP = [0, 1, 3, 4]  # student states: emb, out(base 0), out(base 2), final (base 3)
VOCAB = TINY_CONFIGS["llama"]["vocab_size"]
BLOCK = 16
STEPS = 8


def _make_llama(path: Path) -> Path:
    """conftest's tiny Llama with 4 layers (so a dropped layer leaves a shifted middle layer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": N_LAYERS})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _data(root: Path, n_blocks: int = 8, seed: int = 0) -> Path:
    """A data artifact with ``calib.parquet`` (as mlpfuse.stages.data writes it)."""
    d = root / "data"
    d.mkdir()
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(n_blocks, BLOCK)).astype(np.int32)
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), BLOCK)})
    pq.write_table(table, d / "calib.parquet")
    return d


def _overlay(shard_dir: Path, out: Path) -> Path:
    """Keep the first half of the FF neurons of base layers 0 and 2, tie 3 to 2, drop layer 1."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(shard_dir)
    family = family_for(cfg)

    def base_state(i: int) -> dict[str, torch.Tensor]:
        return load_file(str(shard_dir / layer_file(i)))

    blocks = {}
    for i in (0, TIE[0]):
        sd = base_state(i)
        blocks[i] = {}
        for ref in family.ff_blocks(cfg, sd):
            ff = family.read_ff(cfg, sd, ref)
            blocks[i][ref] = ff.select(torch.arange(ff.intermediate_size // 2))
    blocks[TIE[1]] = blocks[TIE[0]]
    overlay = Overlay(blocks=blocks, skip={SKIP}, tied=[list(TIE)])
    save_overlay(out, overlay, family, cfg, base_state)
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-stage")
    sh = root / "shard"
    shard.run(shard.ShardConfig(model=str(_make_llama(root / "ckpt"))), {}, sh)
    ov = _overlay(sh, root / "overlay")
    export.run(export.ExportConfig(), {"shard": sh}, root / "teacher")
    export.run(export.ExportConfig(), {"shard": sh, "overlay": ov}, root / "student")
    export.run(export.ExportConfig(tied=True), {"shard": sh, "overlay": ov}, root / "student_tied")
    return {"root": root, "shard": sh, "overlay": ov, "data": _data(root),
            "teacher": root / "teacher", "student": root / "student",
            "student_tied": root / "student_tied"}


def _config(**train: object) -> DistillStageConfig:
    base = {"steps": STEPS, "lr": 1e-2, "zero_stage": 2, "micro_batch": 2, "grad_accum": 2,
            "checkpoint_every": 2, "seed": 0}
    return DistillStageConfig(train=DistillConfig(**{**base, **train}), max_blocks=8)


def _inputs(a: dict[str, Path], student: str = "student") -> dict[str, Path]:
    return {"teacher": a["teacher"], "student": a[student], "data": a["data"],
            "overlay": a["overlay"]}


def _ids(a: dict[str, Path], n: int = 4) -> torch.Tensor:
    from mlpfuse.stages.data import read_calib

    return torch.from_numpy(read_calib(a["data"])[:n])


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---------------------------------------------------------------------------------------------
# The layer map


def test_layer_map_for_dropped_layers() -> None:
    assert layer_map_for(4, set()) == [0, 1, 2, 3, 4]
    assert layer_map_for(4, {1}) == LAYER_MAP  # student layer 1 is base layer 2 -> teacher state 3
    assert layer_map_for(4, {0}) == [0, 2, 3, 4]
    assert layer_map_for(4, {0, 2}) == [0, 2, 4]
    # The last base layer dropped: the student's final output (after the final norm) is still
    # compared with the teacher's final output, not with the teacher's un-normed state 3.
    assert layer_map_for(4, {3}) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="outside"):
        layer_map_for(4, {4})
    with pytest.raises(ValueError, match="every layer"):
        layer_map_for(2, {0, 1})


def test_layer_mse_uses_the_map() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(5))
    student = (teacher[0], teacher[1], teacher[3], teacher[4])
    assert layer_mse(student, teacher, LAYER_MAP).item() == 0.0
    assert layer_mse(student, teacher, [0, 1, 2, 4]).item() > 0.0
    with pytest.raises(ValueError, match="same number of layers"):
        layer_mse(student, teacher)


def test_distill_checks_the_map(artifacts: dict[str, Path], tmp_path: Path) -> None:
    teacher = mlpfuse.load(artifacts["teacher"] / "model")
    student = mlpfuse.load(artifacts["student"] / "model")
    batches = [_ids(artifacts, 2)]
    config = _config().train
    with pytest.raises(ValueError, match="or a layer_map"):
        distill(student, teacher, batches, config, tmp_path, progress=False)
    for bad in ([0, 1, 3], [0, 2, 1, 4], [1, 2, 3, 4], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match="layer_map"):
            distill(student, teacher, batches, config, tmp_path, progress=False, layer_map=bad)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The stage


def test_stage_distills_and_writes_a_stock_checkpoint(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = run_stage(_config(), _inputs(artifacts), out)

    assert res["steps"] == STEPS and len(res["losses"]) == STEPS and res["resumed_from"] is None
    assert res["layer_map"] == LAYER_MAP and res["skipped_layers"] == [SKIP]
    assert res["tokens"] == STEPS * 2 * 2 * BLOCK and res["calib_blocks"] == 8
    assert res["seconds"] > 0 and res["stopped_early"] is False and res["form"] == "stock"
    print(f"distill stage: loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}")
    assert res["losses"][-1] < 0.9 * res["losses"][0]
    assert not (out / CHECKPOINTS_DIR).exists()
    assert (out / "model" / "model.safetensors").exists()
    assert "## Distillation" in (out / "model" / "README.md").read_text()
    json.dumps(res)  # goes into the manifest

    # Step 0's loss is the mapped layer-wise MSE of the undistilled student (both micro-batches
    # run before the first update): student state j against teacher state LAYER_MAP[j].
    teacher = AutoModelForCausalLM.from_pretrained(artifacts["teacher"] / "model").eval()
    before = AutoModelForCausalLM.from_pretrained(artifacts["student"] / "model").eval()
    ids = _ids(artifacts)
    with torch.no_grad():
        hs_t = teacher(ids, output_hidden_states=True).hidden_states
        hs_s = before(ids, output_hidden_states=True).hidden_states
    assert len(hs_s) == 4 and len(hs_t) == 5

    def mapped(k: slice, m: list[int]) -> float:
        per_layer = [F.mse_loss(hs_s[j][k], hs_t[m[j]][k]) for j in range(1, 4)]
        return torch.stack(per_layer).mean().item()

    want = (mapped(slice(0, 2), LAYER_MAP) + mapped(slice(2, 4), LAYER_MAP)) / 2
    naive = (mapped(slice(0, 2), [0, 1, 2, 3]) + mapped(slice(2, 4), [0, 1, 2, 3])) / 2
    assert res["losses"][0] == pytest.approx(want, rel=1e-5)
    assert abs(naive - want) > 1e-3 * want  # the map matters for this student

    after = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert after.config.num_hidden_layers == N_LAYERS - 1
    with torch.no_grad():
        got, ref, orig = after(ids).logits, before(ids).logits, teacher(ids).logits
    assert (got - ref).abs().max().item() > 1e-3
    # Distillation pulls the student's output toward the teacher's.
    assert F.mse_loss(got, orig).item() < F.mse_loss(ref, orig).item()
    # trainable="ff": only FF weights moved.
    sd_after, sd_before = after.state_dict(), before.state_dict()
    moved = {n for n in sd_before if not torch.equal(sd_before[n], sd_after[n])}
    assert moved and all(".mlp." in n for n in moved), sorted(moved)


class _Interrupt(RuntimeError):
    pass


def test_interrupted_stage_resumes_to_the_same_weights(
    artifacts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First attempt dies right after its step-4 checkpoint (as a killed Ray task would leave the
    staging dir); the second attempt in the same out_dir resumes from step 4 and ends with the
    weights of an uninterrupted run."""
    full = run_stage(_config(), _inputs(artifacts), tmp_path / "full")

    real_save = trainer_mod._save_checkpoint

    def save_then_die(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        if args[5] == 4:  # steps_done
            raise _Interrupt("killed after the step-4 checkpoint")

    split = tmp_path / "split"
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "_save_checkpoint", save_then_die)
        with pytest.raises(_Interrupt):
            run_stage(_config(), _inputs(artifacts), split)
    saved = json.loads((split / CHECKPOINTS_DIR / "progress.json").read_text())
    assert saved["steps_done"] == 4 and saved["layer_map"] == LAYER_MAP
    assert not (split / "model").exists()

    again = run_stage(_config(), _inputs(artifacts), split)
    assert again["resumed_from"] == 4 and again["steps"] == STEPS
    assert again["losses"] == full["losses"]
    assert not (split / CHECKPOINTS_DIR).exists()
    a, b = _weights(split / "model"), _weights(tmp_path / "full" / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_time_cap_stops_at_a_checkpoint(artifacts: dict[str, Path], tmp_path: Path) -> None:
    config = DistillStageConfig(**{**_config().model_dump(), "minutes": 1e-6})
    res = run_stage(config, _inputs(artifacts), tmp_path / "out")
    assert res["stopped_early"] is True and res["minutes"] == 1e-6
    assert res["steps"] == 2 and res["steps_requested"] == STEPS  # the first checkpoint
    assert res["tokens"] == 2 * 2 * 2 * BLOCK
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "out" / CHECKPOINTS_DIR).exists()
    assert "stopped by the time limit" in (tmp_path / "out" / "model" / "README.md").read_text()


def test_tied_form_stays_tied(artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tied export"):
        run_stage(_config(), _inputs(artifacts, "student_tied"), tmp_path / "wrong")
    with pytest.raises(InputError, match="stock export"):
        run_stage(DistillStageConfig(**{**_config().model_dump(), "tied": True}),
                  _inputs(artifacts), tmp_path / "wrong")

    config = DistillStageConfig(**{**_config().model_dump(), "tied": True})
    res = run_stage(config, _inputs(artifacts, "student_tied"), tmp_path / "out")
    model_dir = tmp_path / "out" / "model"
    assert res["form"] == "tied" and (model_dir / TIES_FILE).exists()
    assert res["losses"][-1] < 0.9 * res["losses"][0]
    # Stored once, as the tied export stores it.
    src = artifacts["student_tied"] / "model"
    assert _weights(model_dir).keys() == _weights(src).keys()

    after, before = mlpfuse.load(model_dir), mlpfuse.load(src)
    layers = after.model.layers
    assert layers[2].mlp.up_proj.weight is layers[1].mlp.up_proj.weight  # window [1, 2] tied
    assert not torch.equal(layers[1].mlp.up_proj.weight, before.model.layers[1].mlp.up_proj.weight)
    ids = _ids(artifacts)
    with torch.no_grad():
        got = after(ids).logits
        assert (got - before(ids).logits).abs().max().item() > 1e-3
    # The trained model as an overlay on the base shard: the tied window one patch, same logits.
    assert res["overlay"] is True
    meta = json.loads((tmp_path / "out" / "overlay.json").read_text())
    assert meta["layers"][str(TIE[0])]["patch"] == meta["layers"][str(TIE[1])]["patch"]
    assert meta["layers"][str(SKIP)] == {"skip": True} and meta["tied"] == [TIE]
    torch.testing.assert_close(_overlay_logits(artifacts, tmp_path / "out", ids), got, rtol=1e-4, atol=1e-5)


def _overlay_logits(a: dict[str, Path], overlay: Path, ids: torch.Tensor) -> torch.Tensor:
    from mlpfuse.stages.model.overlay import load_overrides
    from mlpfuse.stages.model.runner import LayerStreamedModel

    with torch.no_grad():
        return LayerStreamedModel(a["shard"], overrides=load_overrides(overlay)).logits(ids)


def test_overlay_of_the_distilled_model(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """trainable="compressed" (the default) trains only the layers the winner patched; the distill
    overlay reproduces the distilled export on the base shard, also for layers only training moved
    (trainable="ff"), and export padding is cut back to the winner's shapes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    root = tmp_path
    sh = artifacts["shard"]
    cfg = AutoConfig.from_pretrained(sh)
    family = family_for(cfg)
    sd = load_file(str(sh / layer_file(0)))
    (ref,) = family.ff_blocks(cfg, sd)
    ff = family.read_ff(cfg, sd, ref)
    save_overlay(root / "ov", Overlay(blocks={0: {ref: ff.select(torch.arange(ff.intermediate_size // 2))}}),
                 family, cfg, lambda i: load_file(str(sh / layer_file(i))))
    export.run(export.ExportConfig(), {"shard": sh, "overlay": root / "ov"}, root / "student")
    inputs = {"teacher": artifacts["teacher"], "student": root / "student", "data": artifacts["data"],
              "overlay": root / "ov"}
    before = mlpfuse.load(root / "student" / "model")
    ids = _ids(artifacts)
    for trainable, layers in (("compressed", [0]), ("ff", [0, 1, 2, 3])):
        out = root / trainable
        res = run_stage(_config(trainable=trainable), inputs, out)
        assert res["trainable"] == trainable and res["overlay"] is True
        after = mlpfuse.load(out / "model")
        moved = {int(n.split(".")[2]) for n, p in after.named_parameters()
                 if not torch.equal(p, before.get_parameter(n))}
        assert moved == set(layers), (trainable, moved)
        meta = json.loads((out / "overlay.json").read_text())
        assert sorted(int(i) for i in meta["layers"]) == layers
        patch0 = load_file(str(out / meta["layers"]["0"]["patch"]))
        assert {k: v.shape for k, v in patch0.items()} == {
            k: v.shape for k, v in load_file(str(root / "ov" / "ff" / "L00000.safetensors")).items()}
        with torch.no_grad():
            want = after(ids).logits
        torch.testing.assert_close(_overlay_logits(artifacts, out, ids), want, rtol=1e-4, atol=1e-5)
    # trainable="all" moves embeddings: no overlay can hold that, and none is written.
    res = run_stage(_config(trainable="all"), inputs, root / "all")
    assert res["overlay"] is False and not (root / "all" / "overlay.json").exists()


def test_teacher_must_be_the_original(artifacts: dict[str, Path], tmp_path: Path) -> None:
    a = artifacts
    with pytest.raises(InputError, match="same export"):
        run_stage(_config(), {**_inputs(a), "teacher": a["student"]}, tmp_path / "o1")
    with pytest.raises(InputError, match="pass the winner's overlay"):
        no_overlay = {k: v for k, v in _inputs(a).items() if k != "overlay"}
        run_stage(_config(), no_overlay, tmp_path / "o2")
    # A teacher export made from an overlay (an orchestrator manifest says so).
    fake = tmp_path / "compressed_teacher"
    shutil.copytree(a["student"], fake)
    manifest = {"stage": "export", "inputs": {"shard": "k", "overlay": "c"}}
    (fake / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="export of an overlay"):
        run_stage(_config(), {**_inputs(a), "teacher": fake}, tmp_path / "o3")
    with pytest.raises(InputError, match="fewer than one micro-batch"):
        one_block = DistillStageConfig(**{**_config().model_dump(), "max_blocks": 1})
        run_stage(one_block, _inputs(a), tmp_path / "o4")


def test_stage_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DistillStageConfig(train=_config().train, max_blocks=8, minutz=3)
    with pytest.raises(ValidationError):
        DistillStageConfig(train=_config().train, max_blocks=8, minutes=0)
    with pytest.raises(ValidationError):
        DistillStageConfig(train={**_config().train.model_dump(), "stepz": 1}, max_blocks=8)
    config = _config()
    assert config.tied is False and config.minutes is None and config.dtype == "auto"
    with pytest.raises(ValidationError):
        config.max_blocks = 3  # frozen


def test_relative_layer_loss_weighs_every_token_alike() -> None:
    """``relative``: mean over layers and tokens of ‖s − t‖² / ‖t‖²; scaling one token's hidden
    states (teacher and student alike) by 100 changes plain MSE, not the relative loss."""
    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(3))
    student = tuple(t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher)
    want = torch.stack([(((s - t) ** 2).sum(-1) / (t ** 2).sum(-1)).mean()
                        for s, t in zip(student[1:], teacher[1:])]).mean()
    torch.testing.assert_close(layer_mse(student, teacher, relative=True), want)
    scale = torch.ones(2, 3, 1)
    scale[0, 0] = 100.0  # one massive-activation token
    big_t, big_s = tuple(t * scale for t in teacher), tuple(s * scale for s in student)
    torch.testing.assert_close(layer_mse(big_s, big_t, relative=True), want)
    assert layer_mse(big_s, big_t).item() > 100 * layer_mse(student, teacher).item()
