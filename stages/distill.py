"""distill: layer-wise distillation of the compressed winner (the student) against the original
model (the teacher), as a pipeline stage.

Inputs: the teacher and student exports (Hugging Face checkpoints), the calibration blocks of the
data artifact, and the winner's overlay (for the layer map when layers were dropped: each student
layer is compared with the original layer it is, :func:`~mlpfuse.stages.math.distill_loss.layer_map_for`).
Training is the DeepSpeed trainer's (``mlpfuse.stages.model.trainer``: ZeRO 0/2/3, deterministic,
checkpointed, resumable; the losses in ``mlpfuse.stages.math.distill_loss``); on a Ray cluster the
same worker function runs on every Ray Train worker (``mlpfuse.cluster.ray_train``). The stage
writes the distilled student as a Hugging Face checkpoint in the student export's form (stock or
tied), and as an overlay on the base shard so it is scored like every candidate.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mlpfuse.core.artifacts import mirrored_state
from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.distill_loss import layer_map_for
from mlpfuse.stages.model.hf import (
    TIED_STEM,
    TIES_FILE,
    copy_model_files,
    load_export,
    parse_size,
    stored_tensors,
    weight_files,
    write_shards,
    write_ties_spec,
)
from mlpfuse.stages.model.overlay import read_overlay
from mlpfuse.stages.model.trainer import (
    DistillConfig,
    checkpoint_files,
    distill,
    layer_index,
    trainable_names,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# ---------------------------------------------------------------------------------------------
# The pipeline stage: teacher export + student export + calibration data -> distilled student

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
STATE_SYNC_EVERY_S = 2.0  # how often a new checkpoint is looked for, to be kept in a remote store
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistillStageConfig(BaseModel):
    """The distill stage: ``train`` says how to train; the rest, what on and how to write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: DistillConfig
    # The first ``max_blocks`` calibration blocks (rounded down to whole micro-batches) are the
    # training set; step s uses micro-batches in order, cycling.
    max_blocks: int = Field(ge=1)
    # Wall-clock cap on training (minutes, summed over attempts): the run stops at the first
    # checkpoint past it and the stage writes the weights of that step. The result records it.
    minutes: float | None = Field(default=None, gt=0)
    # The student export is the tied form (``mlpfuse_ties.json``): it is loaded with its windows
    # tied (each window trains as one parameter set) and written back in the same tied form.
    tied: bool = False
    # Storage dtype of the written model; "auto": the student export's. Training is float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Data-parallel training processes. More than one: Ray Train workers (TorchTrainer, one
    # process each, gloo on CPUs or NCCL on GPUs; resources.stages.distill sets each one's CPUs and
    # GPUs), started by the pipeline. Worker r of W takes micro-batch ((s*grad_accum + j)*W + r):
    # W workers with grad_accum g train exactly as one process with grad_accum W*g.
    workers: int = Field(default=1, ge=1)


def export_dtype(model_dir: Path) -> torch.dtype:
    """The stored precision an export's config declares (float32 when it declares none)."""
    from transformers import AutoConfig

    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    return _OUT_DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


def run_stage(config: DistillStageConfig, inputs: dict[str, Path], out_dir: Path, *,
              train_fn: Callable[..., Any] | None = None) -> dict:
    """Distill the student export toward the teacher export on calibration blocks.

    ``inputs``: ``teacher``: an export artifact of the *original* model (``teacher/model``);
    ``student``: an export artifact of the compressed winner (``student/model``); ``data``: the
    data artifact (``calib.parquet``); optionally ``overlay``: the winner's overlay directory, whose
    skipped layers map student layers to the teacher layers they came from (needed when layers
    were dropped). Checkpoints go to ``out_dir/checkpoints``, so an attempt killed mid-way resumes
    from the last one when the stage runs again in the same ``out_dir`` (with a remote store, on any
    node: each new checkpoint is also saved in the store, see ``mirrored_state``); they are removed
    once ``out_dir/model`` (a Hugging Face checkpoint in the student export's form) is written.
    ``train_fn``: trains with :func:`~mlpfuse.stages.model.trainer.distill`'s signature; the
    pipeline passes Ray Train's (``mlpfuse.cluster.ray_train``) when ``config.workers`` > 1.
    """
    from mlpfuse.stages.data import read_calib

    if config.workers > 1 and train_fn is None:
        raise InputError(f"distill.workers={config.workers}: several workers train through Ray Train, "
                         "which the pipeline starts (mlpfuse run); a direct call trains in one process")
    out_dir = Path(out_dir)
    teacher_dir, student_dir, data_dir, overlay_dir = _stage_inputs(inputs)
    if teacher_dir.resolve() == student_dir.resolve():
        raise InputError(
            f"teacher and student are the same export ({teacher_dir}): the teacher must be the "
            "original (uncompressed) model"
        )
    _check_teacher_artifact(Path(inputs["teacher"]), Path(inputs["student"]))
    has_ties = (student_dir / TIES_FILE).exists()
    if has_ties != config.tied:
        form = "tied" if has_ties else "stock"
        raise InputError(
            f"{student_dir} is a {form} export but the distill stage has tied={config.tied}; "
            "set tied to match the export form"
        )

    # The teacher stays in its stored precision (computed in float32 one layer at a time by the
    # trainer); the student trains in float32.
    teacher = load_export(teacher_dir, dtype=export_dtype(teacher_dir))
    student = load_export(student_dir, dtype=torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_t = int(teacher.config.num_hidden_layers)
    n_s = int(student.config.num_hidden_layers)
    skipped = set(read_overlay(overlay_dir).skip)
    if overlay_dir is None and n_s != n_t:
        raise InputError(
            f"student has {n_s} decoder layers, teacher {n_t}: pass the winner's overlay (input "
            "'overlay') so each student layer is compared with the teacher layer it came from"
        )
    if n_t - len(skipped) != n_s:
        raise InputError(
            f"the overlay drops layers {sorted(skipped)} of {n_t}, leaving {n_t - len(skipped)}, "
            f"but the student has {n_s}: the teacher must be the original model of this overlay"
        )
    layer_map = layer_map_for(n_t, skipped)
    kept = [i for i in range(n_t) if i not in skipped]  # student layer j is base layer kept[j]

    train = config.train
    if train.trainable == "compressed" and train.train_layers is None and overlay_dir is not None:
        changed = set(read_overlay(overlay_dir).patch_of)
        train = train.model_copy(update={"train_layers": [j for j, i in enumerate(kept) if i in changed]})
    blocks = read_calib(data_dir)[: config.max_blocks]
    n_batches = len(blocks) // train.micro_batch
    if n_batches == 0:
        raise InputError(
            f"{len(blocks)} calibration blocks (max_blocks={config.max_blocks}) are fewer than "
            f"one micro-batch of {train.micro_batch}"
        )
    blocks = blocks[: n_batches * train.micro_batch]
    vocab = min(int(m.get_input_embeddings().get_parameter("weight").shape[0]) for m in (teacher, student))
    if int(blocks.max()) >= vocab:
        raise InputError(
            f"calibration token id {int(blocks.max())} is outside the models' vocabulary ({vocab})"
        )
    batches = [
        torch.from_numpy(blocks[i * train.micro_batch : (i + 1) * train.micro_batch].copy())
        for i in range(n_batches)
    ]

    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    # With a remote store the checkpoints are also kept there, so an attempt on another node resumes.
    with mirrored_state(checkpoint_dir, checkpoint_files, every_s=STATE_SYNC_EVERY_S):
        result = (train_fn or distill)(
            student,
            teacher,
            batches,
            train,
            checkpoint_dir,
            progress=True,
            layer_map=layer_map,
            time_limit_s=None if config.minutes is None else config.minutes * 60.0,
        )
    del teacher

    out_dtype = export_dtype(student_dir) if config.dtype == "auto" else _OUT_DTYPES[config.dtype]
    model_dir = out_dir / MODEL_DIR
    overlay_written = False
    if overlay_dir is not None:
        overlay_written = write_overlay(student, trainable_names(student, train), overlay_dir, out_dir, kept, out_dtype)
    _write_student(student, student_dir, model_dir, out_dtype, tied=config.tied)
    block = int(blocks.shape[1])
    summary = {
        "losses": result.losses,
        "steps": result.steps_done,
        "steps_requested": train.steps,
        "tokens": result.steps_done * train.grad_accum * config.workers * train.micro_batch * block,
        "workers": config.workers,
        "seconds": round(result.seconds, 3),
        "resumed_from": result.resumed_from,
        "minutes": config.minutes,
        "stopped_early": result.stopped_early,
        "calib_blocks": int(len(blocks)),
        "block_size": block,
        "layer_map": layer_map,
        "skipped_layers": sorted(skipped),
        "path": MODEL_DIR,  # relative to the artifact
        "form": "tied" if config.tied else "stock",
        "trainable": train.trainable,
        "train_layers": train.train_layers,
        # The trained model also as an overlay on the base shard (overlay.json beside model/),
        # scored like any candidate; False when training moved parameters outside decoder layers.
        "overlay": overlay_written,
        "dtype": str(out_dtype).removeprefix("torch."),
    }
    _append_card(model_dir, summary)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary


def _stage_inputs(inputs: dict[str, Path]) -> tuple[Path, Path, Path, Path | None]:
    missing = [role for role in ("teacher", "student", "data") if not inputs.get(role)]
    if missing:
        raise InputError(
            f"distill stage inputs {missing} are missing (needs teacher, student, data)"
        )
    teacher_dir = Path(inputs["teacher"]) / MODEL_DIR
    student_dir = Path(inputs["student"]) / MODEL_DIR
    data_dir = Path(inputs["data"])
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        if not (path / "config.json").exists():
            raise InputError(f"input {role!r}: {path} is not an export (no config.json)")
    if not (data_dir / "calib.parquet").exists():
        raise InputError(f"input 'data': {data_dir} has no calib.parquet")
    overlay = inputs.get("overlay")
    overlay_dir = Path(overlay) if overlay else None
    if overlay_dir is not None and not (overlay_dir / "overlay.json").exists():
        raise InputError(f"input 'overlay': {overlay_dir} has no overlay.json")
    return teacher_dir, student_dir, data_dir, overlay_dir


def _check_teacher_artifact(teacher: Path, student: Path) -> None:
    """With the orchestrator's manifests: the teacher export had no overlay, and both exports come
    from the same shard (stage ``run`` calls made by hand have no manifest: nothing to check)."""
    manifests = {}
    for role, path in (("teacher", teacher), ("student", student)):
        try:
            manifests[role] = json.loads((path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            manifests[role] = None
    t, s = manifests["teacher"], manifests["student"]
    if t is not None and (t.get("inputs") or {}).get("overlay"):
        raise InputError(
            f"the teacher artifact {teacher} is an export of an overlay (a compressed candidate); "
            "the teacher must be the export of the original model"
        )
    if t is not None and s is not None:
        ts, ss = (t.get("inputs") or {}).get("shard"), (s.get("inputs") or {}).get("shard")
        if ts and ss and ts != ss:
            raise InputError(
                f"teacher and student exports come from different shards ({ts} vs {ss})"
            )


def write_overlay(student: PreTrainedModel, trained: set[str], winner_dir: Path, out_dir: Path, kept: list[int],
                  dtype: torch.dtype) -> bool:
    """Write the trained student as an overlay on the winner's base shard at ``out_dir``
    (``overlay.json`` and ``ff/`` patches, in the form the compress stage writes): every layer the
    winner patched or training moved gets a patch of its trained tensors (cut back to the winner's
    shapes: export padding is zero neurons, and stays zero under training), tied windows one patch
    each, skipped layers stay skipped. Returns False, writing nothing, when training moved
    parameters outside the decoder layers (embeddings, final norm): no overlay can hold those."""
    from safetensors import safe_open

    from mlpfuse.stages.model.checkpoint import SAFETENSORS_DTYPES
    from mlpfuse.stages.model.families import family_for
    from mlpfuse.stages.model.overlay import OverlayWriter

    if any(layer_index(n) is None for n in trained):
        return False
    meta = read_overlay(winner_dir)
    family = family_for(student.config)
    state = student.state_dict()
    prefix = next((p for p in family.layer_prefixes if any(k.startswith(p.format(0)) for k in state)), None)
    if prefix is None:
        raise RuntimeError(f"no parameter of the student starts with any of {family.layer_prefixes}")
    moved: dict[int, set[str]] = {}  # base layer -> layer-relative keys training changed
    for n in trained:
        j = layer_index(n)
        assert j is not None
        moved.setdefault(kept[j], set()).add(n[len(prefix.format(j)):])
    refs: dict[int, dict[str, Any]] = {}  # the winner's patch tensors as safetensors slices
    for i, name in meta.patch_of.items():
        with safe_open(str(winner_dir / name), framework="pt") as f:
            refs[i] = {k: f.get_slice(k) for k in f.keys()}
    writer = OverlayWriter(out_dir)

    def trained_patch(i: int) -> dict[str, Tensor]:
        j = kept.index(i)
        pfx = prefix.format(j)
        layer_sd = family.canonicalize({k[len(pfx):]: v for k, v in state.items() if k.startswith(pfx)})
        ref = refs.get(i, {})
        patch = {}
        for key in sorted(set(ref) | moved.get(i, set())):
            if key not in layer_sd:
                raise RuntimeError(f"layer {i}: the student has no tensor {key!r}")
            t = layer_sd[key].detach()
            want = ref[key].get_shape() if key in ref else list(t.shape)
            if list(t.shape) != want:
                cut = tuple(slice(0, d) for d in want)
                rest = t.clone()
                rest[cut] = 0
                if len(want) != t.dim() or any(d > e for d, e in zip(want, t.shape)) or rest.any():
                    raise RuntimeError(f"layer {i} {key}: trained {tuple(t.shape)} does not cut back to {want}")
                t = t[cut]
            out_dtype = SAFETENSORS_DTYPES.get(ref[key].get_dtype(), dtype) if key in ref else dtype
            patch[key] = t.to(out_dtype).contiguous().cpu()
        return patch

    for i in sorted(set(refs) | set(moved)):
        writer.add_patch(i, meta.group_of(i), partial(_patch_of_layer, trained_patch, i))
    writer.finish(set(meta.skip), meta.tied)
    return True


def _write_student(
    student: PreTrainedModel, student_dir: Path, model_dir: Path, dtype: torch.dtype, *, tied: bool
) -> None:
    """Write ``student`` at ``model_dir`` in the form of ``student_dir``: stock
    (``save_pretrained``, safetensors) or the export's tied form (the same tensor names stored,
    ``mlpfuse_ties.json`` copied). Tokenizer files and the model card are copied from
    ``student_dir``. Written beside and renamed into place, so a half-written model never stays."""
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.nn.Module.to(student, dtype)
    student.config.dtype = dtype
    if not tied:
        student.save_pretrained(tmp, max_shard_size="2GB")
    else:
        from transformers import AutoConfig

        spec = json.loads((student_dir / TIES_FILE).read_text())
        names: list[str] = [name for name, _ in stored_tensors(weight_files(student_dir, spec["weights"]),
                                                              load=False)]
        state = student.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"tied export tensors {missing[:5]} are not in the loaded student")
        cfg = AutoConfig.from_pretrained(student_dir)
        cfg.dtype = dtype
        cfg.save_pretrained(tmp)

        def cast(t: Tensor) -> Tensor:
            t = t.detach().cpu()
            return t.to(dtype) if t.is_floating_point() else t

        files, _ = write_shards(tmp, TIED_STEM, [{n: cast(state[n]) for n in names}],
                                total_parameters=sum(p.numel() for p in student.parameters()),
                                max_bytes=parse_size("2GB"))
        write_ties_spec(tmp, files, windows=spec["windows"], ties=spec["ties"])
    copy_model_files(student_dir, tmp, extra=("README.md",))
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def _append_card(model_dir: Path, summary: dict) -> None:
    card = model_dir / "README.md"
    if not card.exists():
        return
    losses = summary["losses"]
    lines = [
        "",
        "## Distillation",
        "",
        "After compression the feed-forward weights were distilled layer by layer against the "
        "original model (MSE between hidden states; dropped layers mapped to the original layer "
        "each kept layer came from).",
        "",
        f"- steps: {summary['steps']} of {summary['steps_requested']}"
        + (" (stopped by the time limit)" if summary["stopped_early"] else ""),
        f"- tokens: {summary['tokens']:,} ({summary['calib_blocks']} calibration blocks of "
        f"{summary['block_size']})",
    ]
    if losses:
        lines.append(f"- loss: {losses[0]:.4g} → {losses[-1]:.4g}")
    card.write_text(card.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def _patch_of_layer(make: Callable[[int], dict[str, Tensor]], i: int, group: tuple[int, ...]) -> dict[str, Tensor]:
    """Layer ``i``'s patch for its tied ``group`` (the first member's: the group shares it)."""
    return make(i)
