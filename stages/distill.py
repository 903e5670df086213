"""distill: layer-wise distillation of a compressed student against the original model.

The student (the compressed winner) learns to reproduce the teacher's (the original model's)
hidden state after every decoder layer::

    loss = mean_l MSE(h_student[l], h_teacher[l])  +  lm_loss_weight * LM loss(student)

or, with ``layer_loss: relative``, each token's squared error relative to the teacher's hidden
state at that token, ``mean_l mean_t ‖h_s[l, t] − h_t[l, t]‖² / ‖h_t[l, t]‖²``: in models with
massive activations (SmolLM2's attention-sink token carries hidden states hundreds of times the
norm of the others) plain MSE is dominated by a few tokens and dimensions; the relative form
weighs every token alike.

where ``h[l]`` for l = 1..L are the ``output_hidden_states`` entries after each decoder layer
(entry 0, the embeddings, is left out; for Llama-style models the last entry is after the final
norm). Training runs in a real DeepSpeed engine with ZeRO stage 0, 2 or 3, one process per
worker: :func:`distill` on this machine (world size 1, gloo on CPU or one GPU),
:func:`ray_train_distill` on a Ray cluster through Ray Train (one GPU per worker). Both run the same
per-worker function, so what is tested locally is what runs on the cluster.

A student with decoder layers dropped has fewer hidden states than the teacher: ``layer_map``
(:func:`layer_map_for`) compares each student layer's output with the output of the original
layer it is (the j-th kept layer), and the final output with the teacher's final output.

The pipeline stage (:class:`DistillStageConfig`, :func:`run_stage`) wraps this around artifacts:
the teacher and student exports (Hugging Face checkpoints), the calibration blocks of the data
artifact and the winner's overlay (for the layer map); it writes the distilled student as a
Hugging Face checkpoint in the student export's form (stock or tied).

Determinism and resume: the micro-batch of every (step, micro-step, rank) is fixed by its index,
the RNG is re-seeded from (seed, step, rank) before each step, and a checkpoint holds the module,
the optimizer state and the loss history. A re-run with the same ``checkpoint_dir`` therefore
continues from the last complete checkpoint and ends with the weights an uninterrupted run ends
with (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from stages.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STAGE_VERSION = 1

# AdamW settings of the client optimizer. Weight decay is off: distillation pulls the student
# toward the teacher, and decay would pull the compressed weights toward zero instead.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.0

# Names of the modules that are a decoder layer's feed-forward sublayer, across the families in
# stages.families: ``mlp`` (GPT-2 c_fc/c_proj, Llama/Gemma/Qwen and MoE blocks), ``intermediate``
# (BERT's first FF linear), ``fc1``/``fc2`` (OPT). BERT's second FF linear is the ``output`` module
# that sits beside ``intermediate`` (not ``attention.output``); see :func:`ff_parameter_names`.
FF_MODULE_NAMES = frozenset({"mlp", "intermediate", "fc1", "fc2"})

# Files in a checkpoint directory.
PROGRESS_FILE = "progress.json"
_TAG_PREFIX = "step"
# DeepSpeed op builds (the CPU shared-memory comm op, built at every engine start) are cached here.
DEFAULT_TORCH_EXTENSIONS_DIR = Path("~/.cache/mlpfuse/torch_extensions").expanduser()


class DistillConfig(BaseModel):
    """How to distill. ``steps`` counts optimizer steps; each consumes ``grad_accum`` micro-batches
    of ``micro_batch`` sequences per worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    # 0: plain data parallel; 2: optimizer state and gradients partitioned; 3: parameters too.
    zero_stage: Literal[0, 2, 3] = 2
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    # The layer loss alone keeps the student close to the teacher layer by layer; an LM term
    # helps when the compressed layers cannot match every hidden state.
    lm_loss_weight: float = Field(default=0.0, ge=0.0)
    layer_loss: Literal["mse", "relative"] = "mse"
    # "compressed": only the feed-forward sublayers of ``train_layers`` move (the distill stage
    # fills them with the layers compression changed; None: every FF sublayer); "ff": every FF
    # sublayer; "all": every parameter of the student.
    trainable: Literal["compressed", "ff", "all"] = "compressed"
    # Student decoder-layer indices whose FF sublayers train with trainable="compressed".
    train_layers: list[int] | None = None
    checkpoint_every: int = Field(ge=1)
    seed: int
    # Keep fp32 master weights and Adam moments in host memory (ZeRO 2/3 only).
    offload_optimizer: bool = False
    # bfloat16 forward/backward with fp32 master weights (GPU workers).
    bf16: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistillConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer=True needs zero_stage 2 or 3, got zero_stage=0")
        return self

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the weights after a given step (not how many steps, nor
        how often to checkpoint): a resumed run must agree on all of them."""
        return self.model_dump(exclude={"steps", "checkpoint_every"})


@dataclass(frozen=True)
class DistillResult:
    """``losses[s]`` is the training loss of step s (mean over its micro-batches and workers) for
    every step done, resumed ones included; ``resumed_from`` is the step the run continued from
    (None for a fresh run). ``seconds``: wall-clock seconds of training summed over the attempts
    (each attempt counted up to its last checkpoint; not compared by ``==``). ``stopped_early``:
    the run stopped at a checkpoint before ``steps`` because ``time_limit_s`` was exceeded."""

    losses: list[float]
    steps_done: int
    resumed_from: int | None
    seconds: float = field(default=0.0, compare=False)
    stopped_early: bool = False


# ---------------------------------------------------------------------------------------------
# Public entry points


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: list[Tensor],
    config: DistillConfig,
    checkpoint_dir: Path,
    progress: bool = True,
    *,
    layer_map: list[int] | None = None,
    time_limit_s: float | None = None,
) -> DistillResult:
    """Distill ``student`` toward the frozen ``teacher`` in this process; ``student`` is trained in
    place.

    ``batches``: token ids, each [micro_batch, T]; step s, micro-step j uses
    ``batches[(s * grad_accum + j) % len(batches)]``. Checkpoints go to ``checkpoint_dir`` every
    ``config.checkpoint_every`` steps and at the end; a re-run with the same directory resumes
    from the last complete one. Uses the caller's torch.distributed process group if there is one
    (world size 1 expected), else creates a loopback-only one for the call (gloo, file rendezvous)
    and destroys it at the end.

    ``layer_map``: for a student with fewer decoder layers than the teacher (layers dropped),
    ``layer_map[j]`` is the teacher's ``output_hidden_states`` index that student index j is
    compared with; one entry per student hidden state (num_hidden_layers + 1, the embeddings
    first), strictly increasing, from 0 (embeddings) to the teacher's last index (both models'
    last entry is the final output, after the final norm). None: the identity, equal layer counts.
    :func:`layer_map_for` builds it from the dropped layers. Part of what a resume must agree on.

    ``time_limit_s``: stop at the first checkpoint written once this many seconds of training
    (summed over attempts, as checkpoints record it) have passed; the result says
    ``stopped_early``. A resumed run already past the limit does no step.
    """
    layer_map = _check_models(student, teacher, config, layer_map)
    _check_batches(batches, config)
    with _local_process_group():
        return _distill_worker(
            student,
            teacher,
            batches,
            config,
            Path(checkpoint_dir),
            progress=progress,
            layer_map=layer_map,
            time_limit_s=time_limit_s,
        )


def ray_train_distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: list[Tensor],
    config: DistillConfig,
    checkpoint_dir: Path,
    *,
    num_workers: int,
    use_gpu: bool = True,
    resources_per_worker: dict[str, float] | None = None,
    rendezvous: Literal["tcp", "file"] = "tcp",
    max_failures: int = 0,
    progress: bool = False,
    layer_map: list[int] | None = None,
    time_limit_s: float | None = None,
) -> DistillResult:
    """Distill on a Ray cluster: ``num_workers`` Ray Train workers (one GPU each with ``use_gpu``)
    run the same per-worker function as :func:`distill`, data parallel under ZeRO; ``student`` is
    updated in place with the trained weights when the run ends.

    Worker r of W takes micro-batch ``((s * grad_accum + j) * W + r) % len(batches)``.
    ``checkpoint_dir`` must be a path every worker and this driver can read and write (a shared
    mount); it holds the DeepSpeed checkpoints (a restarted run, or a Ray Train retry when
    ``max_failures`` > 0, resumes from them) and Ray Train's run directory (``ray/``).
    ``rendezvous``: "tcp" is Ray Train's own (``env://`` at worker 0's address, for multi-node
    clusters); "file" rendezvous through a file in ``checkpoint_dir`` (nothing listens on the
    network for it; single-node runs and tests). Needs a connected Ray (``ray.init``).
    ``layer_map`` and ``time_limit_s``: as for :func:`distill` (the workers agree on stopping).
    """
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    layer_map = _check_models(student, teacher, config, layer_map)
    _check_batches(batches, config)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if rendezvous not in ("tcp", "file"):
        raise ValueError(f"rendezvous must be 'tcp' or 'file', got {rendezvous!r}")
    checkpoint_dir = Path(checkpoint_dir).resolve()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    torch_config: TorchConfig
    if rendezvous == "file":
        torch_config = _file_rendezvous_torch_config(str(checkpoint_dir))
    else:
        torch_config = TorchConfig()
    loop_config = {
        # Object refs, so the models go through the object store once, not inside the trainer.
        "student": ray.put(student),
        "teacher": ray.put(teacher),
        "batches": ray.put([b.cpu().numpy() for b in batches]),
        "config": config.model_dump(),
        "checkpoint_dir": str(checkpoint_dir),
        "progress": progress,
        "layer_map": layer_map,
        "time_limit_s": time_limit_s,
    }
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_config,
        torch_config=torch_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=RunConfig(
            name="distill",
            storage_path=str(checkpoint_dir / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train run ended without the final weights checkpoint")
    with result.checkpoint.as_directory() as final_dir:
        from safetensors.torch import load_file

        trained = load_file(str(Path(final_dir) / _FINAL_WEIGHTS))
    ties = _tied_groups(student)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name in trained:
                param.copy_(trained[name].to(dtype=param.dtype, device=param.device))
    _check_ties(student, ties)
    metrics = result.metrics or {}
    return DistillResult(
        losses=[float(x) for x in metrics["losses"]],
        steps_done=int(metrics["steps_done"]),
        resumed_from=metrics["resumed_from"],
        seconds=float(metrics.get("seconds", 0.0)),
        stopped_early=bool(metrics.get("stopped_early", False)),
    )


def ff_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them, tied ones once) of the parameters inside the
    feed-forward sublayers: modules named in :data:`FF_MODULE_NAMES`, and an ``output`` module
    whose parent also holds an ``intermediate`` (BERT's second FF linear)."""
    roots: list[str] = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in FF_MODULE_NAMES:
            roots.append(name)
        elif last == "output":
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if hasattr(parent, "intermediate"):
                roots.append(name)
    return {
        n for n, _ in model.named_parameters() if any(n.startswith(root + ".") for root in roots)
    }


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter name (``model.layers.3.mlp...`` -> 3), or None."""
    m = _LAYER_INDEX.search(name)
    return None if m is None else int(m.group(1))


def trainable_names(model: nn.Module, config: DistillConfig) -> set[str]:
    """The parameter names ``config.trainable`` trains (tied parameters once)."""
    if config.trainable == "all":
        return {n for n, _ in model.named_parameters()}
    ff = ff_parameter_names(model)
    if config.trainable == "ff" or config.train_layers is None:
        return ff
    keep = set(config.train_layers)
    return {n for n in ff if layer_index(n) in keep}


def layer_mse(
    student_hidden: tuple[Tensor, ...],
    teacher_hidden: tuple[Tensor, ...],
    layer_map: list[int] | None = None,
    relative: bool = False,
) -> Tensor:
    """Mean over decoder layers of the MSE between hidden states, each [b, T, H]; entry 0 (the
    embeddings) is skipped. Computed in float32 whatever the models' dtype. ``layer_map[j]``: the
    teacher entry student entry j is compared with (None: the same index, equal lengths).
    ``relative``: per token, the squared error over the teacher's squared norm, averaged."""
    if student_hidden is None or teacher_hidden is None:
        raise RuntimeError("a model returned no hidden states for output_hidden_states=True")
    if layer_map is not None:
        if len(layer_map) != len(student_hidden) or max(layer_map) >= len(teacher_hidden):
            raise ValueError(
                f"layer_map {layer_map} does not fit {len(student_hidden)} student and "
                f"{len(teacher_hidden)} teacher hidden states"
            )
        teacher_hidden = tuple(teacher_hidden[i] for i in layer_map)
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden) - 1} layers, teacher {len(teacher_hidden) - 1}: "
            "layer-wise distillation needs the same number of layers"
        )
    def error(s: Tensor, t: Tensor) -> Tensor:
        s, t = s.float(), t.float()
        if not relative:
            return F.mse_loss(s, t)
        return (((s - t) ** 2).sum(-1) / (t * t).sum(-1).clamp_min(1e-12)).mean()

    per_layer = [error(s, t) for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)]
    return torch.stack(per_layer).mean()


# ---------------------------------------------------------------------------------------------
# The per-worker function: one DeepSpeed engine, run by distill() and by every Ray Train worker.


def _distill_worker(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: list[Tensor],
    config: DistillConfig,
    checkpoint_dir: Path,
    *,
    progress: bool,
    on_checkpoint: Callable[[int, list[float]], None] | None = None,
    layer_map: list[int] | None = None,
    time_limit_s: float | None = None,
) -> DistillResult:
    """Train ``student`` in place; the process group must exist. ``on_checkpoint(steps_done,
    losses)`` is called on every worker after each checkpoint (Ray Train reports from it).
    ``layer_map``: resolved (a full list, see :func:`_check_models`) or None for the identity."""
    started = time.monotonic()
    _prepare_deepspeed_env()
    import deepspeed
    from tqdm.auto import tqdm

    from cluster.zero import fit_buckets, zero_config

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _batches_fingerprint(batches)
    saved = _read_progress(checkpoint_dir, config, fingerprint, world, layer_map)
    prior_seconds = float(saved.get("seconds", 0.0)) if saved is not None else 0.0

    def elapsed() -> float:
        return prior_seconds + time.monotonic() - started

    if saved is not None and saved["steps_done"] > config.steps:
        raise InputError(
            f"{checkpoint_dir} holds {saved['steps_done']} distill steps, more than steps={config.steps}; "
            "ask for at least that many or use a fresh checkpoint_dir"
        )

    ds_config = fit_buckets(
        zero_config(
            config.zero_stage,
            micro_batch=config.micro_batch,
            grad_accum=config.grad_accum,
            offload_optimizer=config.offload_optimizer,
            bf16=config.bf16,
        ),
        hidden_size=int(student.config.hidden_size),
    )

    _register_output_capture(student)
    _register_output_capture(teacher)
    ties = _tied_groups(student)
    student_mode, teacher_mode = student.training, teacher.training
    requires_grad = {name: p.requires_grad for name, p in student.named_parameters()}
    trainable = trainable_names(student, config)
    if not trainable:
        raise ValueError(
            f"trainable={config.trainable!r} (train_layers={config.train_layers}) found no feed-forward "
            f"parameters in {type(student).__name__}: no module named {sorted(FF_MODULE_NAMES)} (or BERT's "
            "FF output) in those layers; use trainable='all'"
        )
    # ZeRO-3 partitions the module's parameters and bf16 casts them: both would leave the caller's
    # model unusable, so those engines train a copy whose fp32 weights are copied back at the end.
    in_place = config.zero_stage != 3 and not config.bf16
    engine: Any = None
    losses: list[float] = []
    start = 0
    resumed_from: int | None = None
    stopped_early = False
    try:
        for name, p in student.named_parameters():
            p.requires_grad_(name in trainable)
        module = student if in_place else copy.deepcopy(student)
        optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad],
            lr=config.lr,
            betas=ADAMW_BETAS,
            eps=ADAMW_EPS,
            weight_decay=ADAMW_WEIGHT_DECAY,
        )
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        device = engine.device
        teacher.to(device)
        teacher.eval()
        engine.train()

        if saved is not None:
            load_path, _ = engine.load_checkpoint(
                str(checkpoint_dir),
                tag=saved["tag"],
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if load_path is None:
                raise InputError(
                    f"{checkpoint_dir / PROGRESS_FILE} names checkpoint {saved['tag']!r}, which "
                    "DeepSpeed cannot load; delete the directory to start over"
                )
            start = resumed_from = int(saved["steps_done"])
            losses = [float(x) for x in saved["losses"]]

        # Under a wall-clock cap the step count is only a ceiling: the bar counts steps and shows
        # the minutes used of the cap instead of a misleading total.
        bar = tqdm(
            total=config.steps if time_limit_s is None else None,
            initial=start,
            desc="distill",
            unit="step",
            disable=not progress or rank != 0,
        )
        devices = [device] if device.type == "cuda" else []
        # Past the limit already (from the record, so every worker agrees): no step runs.
        if time_limit_s is not None and start < config.steps and prior_seconds > time_limit_s:
            stopped_early = True
        with torch.random.fork_rng(devices=devices), bar:
            for step in range(start, start if stopped_early else config.steps):
                torch.manual_seed(_step_seed(config.seed, step, rank))
                step_loss = torch.zeros((), device=device, dtype=torch.float32)
                for micro in range(config.grad_accum):
                    index = ((step * config.grad_accum + micro) * world + rank) % len(batches)
                    ids = batches[index].to(device)
                    loss = _distill_loss(engine, teacher, ids, config.lm_loss_weight, layer_map,
                                         config.layer_loss == "relative")
                    engine.backward(loss)
                    engine.step()
                    step_loss += loss.detach().float()
                if world > 1:
                    torch.distributed.all_reduce(step_loss)
                losses.append(step_loss.item() / (config.grad_accum * world))
                bar.update(1)
                if time_limit_s is None:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                else:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", minutes=f"{elapsed() / 60:.1f}/{time_limit_s / 60:g}")
                done = step + 1
                if done % config.checkpoint_every == 0 or done == config.steps:
                    _save_checkpoint(
                        engine,
                        checkpoint_dir,
                        config,
                        fingerprint,
                        world,
                        done,
                        losses,
                        rank,
                        layer_map=layer_map,
                        seconds=elapsed(),
                    )
                    if on_checkpoint is not None:
                        on_checkpoint(done, losses)
                    if (
                        time_limit_s is not None
                        and done < config.steps
                        and _all_agree(elapsed() > time_limit_s, device, world)
                    ):
                        stopped_early = True
                        break

        if not in_place:
            _copy_trained_weights(module, student, trainable)
    finally:
        if engine is not None:
            engine.destroy()
        for name, p in student.named_parameters():
            p.requires_grad_(requires_grad[name])
        student.train(student_mode)
        teacher.train(teacher_mode)
    _check_ties(student, ties)
    return DistillResult(
        losses=losses,
        steps_done=len(losses),
        resumed_from=resumed_from,
        seconds=elapsed(),
        stopped_early=stopped_early,
    )


def _all_agree(flag: bool, device: torch.device, world: int) -> bool:
    """True on every worker when ``flag`` is True on any (clocks differ between workers)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _distill_loss(
    engine: Any,
    teacher: nn.Module,
    ids: Tensor,
    lm_loss_weight: float,
    layer_map: list[int] | None = None,
    relative: bool = False,
) -> Tensor:
    """The loss of one micro-batch ``ids`` [b, T]."""
    with torch.no_grad():
        teacher_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    if lm_loss_weight == 0:  # no labels argument: encoder-only models take none
        out = engine(input_ids=ids, output_hidden_states=True)
        return layer_mse(out.hidden_states, teacher_hidden, layer_map, relative)
    out = engine(input_ids=ids, labels=ids, output_hidden_states=True)
    return (
        layer_mse(out.hidden_states, teacher_hidden, layer_map, relative)
        + lm_loss_weight * out.loss.float()
    )


def _step_seed(seed: int, step: int, rank: int) -> int:
    # Re-seeding per step (not once per run) makes dropout masks independent of where a run resumed.
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _save_checkpoint(
    engine: Any,
    checkpoint_dir: Path,
    config: DistillConfig,
    fingerprint: str,
    world: int,
    steps_done: int,
    losses: list[float],
    rank: int,
    *,
    layer_map: list[int] | None = None,
    seconds: float = 0.0,
) -> None:
    """DeepSpeed checkpoint ``step<N>`` first, then (rank 0) the progress JSON that names it,
    atomically; only then are older checkpoints deleted. A run killed at any point leaves the
    progress JSON naming a complete checkpoint (or no JSON: a fresh start)."""
    tag = f"{_TAG_PREFIX}{steps_done:09d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"steps_done": steps_done})
    if rank == 0:
        record = {
            "stage": "distill",
            "stage_version": STAGE_VERSION,
            "steps_done": steps_done,
            "tag": tag,
            "losses": losses,
            "trajectory": config.trajectory(),
            "batches_sha256": fingerprint,
            "world_size": world,
            "layer_map": layer_map,
            "seconds": seconds,
        }
        _write_json_atomic(checkpoint_dir / PROGRESS_FILE, record)
        for old in checkpoint_dir.glob(f"{_TAG_PREFIX}*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def _read_progress(
    checkpoint_dir: Path,
    config: DistillConfig,
    fingerprint: str,
    world: int,
    layer_map: list[int] | None = None,
) -> dict | None:
    path = checkpoint_dir / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path} is not valid JSON ({e}); delete {checkpoint_dir} to start over"
        ) from None
    if record.get("stage") != "distill" or record.get("stage_version") != STAGE_VERSION:
        raise InputError(
            f"{path} is not a distill v{STAGE_VERSION} checkpoint; use a fresh checkpoint_dir"
        )
    mismatched = {
        k: (record["trajectory"].get(k), v)
        for k, v in config.trajectory().items()
        if record["trajectory"].get(k) != v
    }
    if mismatched:
        raise InputError(
            f"{checkpoint_dir} was written with other distill settings (saved, now): {mismatched}; "
            "resume with the same settings or use a fresh checkpoint_dir"
        )
    if record["batches_sha256"] != fingerprint:
        raise InputError(
            f"{checkpoint_dir} was written for other batches; use a fresh checkpoint_dir"
        )
    if record["world_size"] != world:
        raise InputError(
            f"{checkpoint_dir} was written by {record['world_size']} workers, this run has {world}; "
            "resume with the same number of workers"
        )
    if record.get("layer_map") != layer_map:
        raise InputError(
            f"{checkpoint_dir} was written with layer_map {record.get('layer_map')}, this run has "
            f"{layer_map}; use a fresh checkpoint_dir"
        )
    return record


def _write_json_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _batches_fingerprint(batches: list[Tensor]) -> str:
    h = hashlib.sha256()
    for b in batches:
        t = b.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Models, weights and ties


def _check_models(
    student: nn.Module,
    teacher: nn.Module,
    config: DistillConfig,
    layer_map: list[int] | None = None,
) -> list[int] | None:
    """Refuse a teacher that is (or shares storage with) the student; returns ``layer_map``
    checked against the two models (None stays None: the identity, equal layer counts)."""
    if student is teacher:
        raise ValueError(
            "teacher is the student: distill against the original (uncompressed) model, a separate object"
        )
    teacher_storage = {_storage_ptr(p) for p in teacher.parameters()} - {0}
    shared = [n for n, p in student.named_parameters() if _storage_ptr(p) in teacher_storage]
    if shared:
        raise ValueError(
            f"student and teacher share parameter storage ({', '.join(shared[:5])}"
            f"{', ...' if len(shared) > 5 else ''}): the teacher must be an independent copy of the original"
        )
    s = getattr(student.config, "hidden_size", None)
    t = getattr(teacher.config, "hidden_size", None)
    if s != t:
        raise ValueError(
            f"student hidden_size={s} differs from teacher hidden_size={t}: "
            "layer-wise MSE needs them equal"
        )
    n_s = getattr(student.config, "num_hidden_layers", None)
    n_t = getattr(teacher.config, "num_hidden_layers", None)
    if layer_map is None:
        if n_s != n_t:
            raise ValueError(
                f"student num_hidden_layers={n_s} differs from teacher num_hidden_layers={n_t}: "
                "layer-wise MSE needs them equal, or a layer_map (see layer_map_for)"
            )
        return None
    layer_map = [int(i) for i in layer_map]
    if (
        n_s is None
        or n_t is None
        or len(layer_map) != n_s + 1
        or layer_map[0] != 0
        or layer_map[-1] != n_t
        or any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False))
    ):
        raise ValueError(
            f"layer_map {layer_map} must have one entry per student hidden state ({n_s} layers + "
            f"embeddings), strictly increase from 0 (embeddings) and end at the teacher's final "
            f"output ({n_t})"
        )
    return None if layer_map == list(range(n_t + 1)) else layer_map


def layer_map_for(num_teacher_layers: int, skipped: set[int] | list[int]) -> list[int]:
    """The ``layer_map`` of a student made from the teacher by dropping decoder layers ``skipped``
    (base indices): student hidden state j (the output of its layer j-1, the (j-1)-th kept base
    layer k) is compared with teacher state k+1; entry 0 (embeddings) with 0; the last entry (the
    final output, after the final norm in both models) with the teacher's last, also when the
    teacher's last layer was the one dropped."""
    dropped = {int(i) for i in skipped}
    bad = sorted(i for i in dropped if not 0 <= i < num_teacher_layers)
    if bad:
        raise ValueError(f"skipped layers {bad} outside 0..{num_teacher_layers - 1}")
    kept = [i for i in range(num_teacher_layers) if i not in dropped]
    if not kept:
        raise ValueError("every layer is skipped")
    return [0, *(k + 1 for k in kept[:-1]), num_teacher_layers]


def _register_output_capture(model: nn.Module) -> None:
    """Make ``output_hidden_states=True`` work for a model unpickled in this process.

    transformers 5 records hidden states through hooks driven by a per-process registry of model
    classes that ``PreTrainedModel.__init__`` fills. A model that arrives pickled in a fresh
    process (a Ray worker) never ran ``__init__`` there, and its forward silently returns
    ``hidden_states=None``. Registering its classes again restores the recording.
    """
    from transformers import PreTrainedModel

    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry records outputs some other way
        return
    for module in model.modules():
        if (
            isinstance(module, PreTrainedModel)
            and str(module.__class__) not in _CAN_RECORD_REGISTRY
        ):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def _storage_ptr(t: Tensor) -> int:
    if t.device.type == "meta":
        return 0
    return int(t.untyped_storage().data_ptr())


def _check_batches(batches: list[Tensor], config: DistillConfig) -> None:
    if not batches:
        raise ValueError("batches is empty")
    for i, b in enumerate(batches):
        if not isinstance(b, Tensor) or b.ndim != 2 or b.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"batches[{i}] must be an integer tensor [micro_batch, T], got {_describe(b)}"
            )
        if b.shape[0] != config.micro_batch:
            raise ValueError(
                f"batches[{i}] has {b.shape[0]} sequences, micro_batch={config.micro_batch}"
            )


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one nn.Parameter (tied embeddings, FF-merged windows)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _check_ties(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = model.get_parameter(names[0])
        broken = [n for n in names[1:] if model.get_parameter(n) is not first]
        if broken:
            raise RuntimeError(
                f"tied parameters came apart during distillation: {names[0]} vs {broken}"
            )


def _copy_trained_weights(module: nn.Module, student: nn.Module, trainable: set[str]) -> None:
    """Full fp32 values of ``module``'s trainable parameters (ZeRO-3 partitions / bf16 masters,
    gathered; a collective, so every worker calls it) into ``student``'s parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    source = dict(module.named_parameters())
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name not in trainable:
                continue
            full = safe_get_full_fp32_param(source[name])
            if full is None:  # not partitioned and no master copy: the parameter itself
                full = source[name].detach()
            param.copy_(full.reshape(param.shape).to(dtype=param.dtype, device=param.device))


# ---------------------------------------------------------------------------------------------
# Process group and environment


def _prepare_deepspeed_env() -> None:
    # Compiled DeepSpeed ops are cached across runs; without a GPU DeepSpeed must use its CPU
    # accelerator (it would otherwise probe for one and warn).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def _local_process_group() -> Iterator[None]:
    """The caller's process group if one exists; else a world-size-1 group (nccl with a GPU, gloo
    without) created through a file rendezvous (torch's TCP store would listen on every
    interface), its sockets on the loopback interface, destroyed on exit. DeepSpeed also wants the
    launcher's rank variables: the missing ones are set for the call and removed after it."""
    created = not torch.distributed.is_initialized()
    tmp = Path(tempfile.mkdtemp(prefix="mlpfuse-pg-")) if created else None
    loopback = _loopback_interface() if created else ""
    # NCCL opens its bootstrap socket at the first collective, so the variables stay set for the
    # whole call, not only around init_process_group.
    sockets = {"GLOO_SOCKET_IFNAME": loopback, "NCCL_SOCKET_IFNAME": loopback} if created else {}
    try:
        with _temporary_env(sockets, override=True):
            if tmp is not None:
                torch.distributed.init_process_group(
                    "nccl" if torch.cuda.is_available() else "gloo",
                    init_method=f"file://{tmp}/rendezvous",
                    rank=0,
                    world_size=1,
                )
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if world != 1 and "LOCAL_RANK" not in os.environ:
                raise RuntimeError(
                    f"distill() joined a process group of {world} ranks without LOCAL_RANK set; "
                    "start the ranks with torchrun or the deepspeed launcher, or use "
                    "ray_train_distill"
                )
            rank_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"}
            with _temporary_env(rank_env, override=False):
                yield
    finally:
        if tmp is not None:
            if torch.distributed.is_initialized():
                # Through DeepSpeed, which also drops the groups it cached: a later engine in this
                # process would otherwise use groups of the destroyed world.
                _prepare_deepspeed_env()
                import deepspeed.comm

                if deepspeed.comm.is_initialized():
                    deepspeed.comm.destroy_process_group()
                else:
                    torch.distributed.destroy_process_group()
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _temporary_env(values: dict[str, str], *, override: bool) -> Iterator[None]:
    """Set ``values`` in os.environ (only the unset ones unless ``override``) and undo it after."""
    previous = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if override or k not in os.environ:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, old in previous.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def _loopback_interface() -> str:
    import socket

    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    raise RuntimeError("no loopback network interface found for the local gloo process group")


# ---------------------------------------------------------------------------------------------
# Ray Train plumbing

_FINAL_WEIGHTS = "student.safetensors"


def _ray_train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: the process group exists (Ray Train made it)."""
    import ray
    import ray.train
    from safetensors.torch import save_file

    student = ray.get(loop_config["student"])
    teacher = ray.get(loop_config["teacher"])
    # Arrays from the object store are read-only views: copy before handing them to torch.
    batches = [torch.from_numpy(b.copy()) for b in ray.get(loop_config["batches"])]
    config = DistillConfig(**loop_config["config"])
    checkpoint_dir = Path(loop_config["checkpoint_dir"])

    def report(steps_done: int, losses: list[float]) -> None:
        ray.train.report({"steps_done": steps_done, "loss": losses[-1]})

    result = _distill_worker(
        student,
        teacher,
        batches,
        config,
        checkpoint_dir,
        progress=loop_config["progress"],
        on_checkpoint=report,
        layer_map=loop_config.get("layer_map"),
        time_limit_s=loop_config.get("time_limit_s"),
    )
    metrics = {
        "steps_done": result.steps_done,
        "loss": result.losses[-1] if result.losses else None,
        "losses": result.losses,
        "resumed_from": result.resumed_from,
        "seconds": result.seconds,
        "stopped_early": result.stopped_early,
    }
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="mlpfuse-distill-") as out:
        weights = {n: p.detach().cpu().contiguous() for n, p in student.named_parameters()}
        save_file(weights, str(Path(out) / _FINAL_WEIGHTS))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))


def _file_rendezvous_torch_config(store_dir: str) -> Any:
    """A Ray Train TorchConfig whose process group meets through a file in ``store_dir`` (a fresh
    file per worker-group start, as a file store cannot be reused) instead of a TCP store."""
    import uuid
    from dataclasses import dataclass as _dataclass
    from datetime import timedelta

    import ray
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    def set_rank_env() -> None:
        ctx = ray.train.get_context()
        os.environ["RANK"] = str(ctx.get_world_rank())
        os.environ["WORLD_SIZE"] = str(ctx.get_world_size())
        os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
        os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
        os.environ["NODE_RANK"] = str(ctx.get_node_rank())

    def init_group(
        backend: str, world_rank: int, world_size: int, url: str, timeout_s: int
    ) -> None:
        torch.distributed.init_process_group(
            backend,
            init_method=url,
            rank=world_rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )

    def destroy_group() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    class FileRendezvousBackend(Backend):
        share_cuda_visible_devices = True

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            gpus = worker_group.get_resources_per_worker().get("GPU", 0)
            backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
            store = Path(backend_config.store_dir) / ".rendezvous"
            store.mkdir(parents=True, exist_ok=True)
            self.store_file = store / uuid.uuid4().hex
            url = f"file://{self.store_file}"
            worker_group.execute(set_rank_env)
            ray.get(
                [
                    worker_group.execute_single_async(
                        i,
                        init_group,
                        backend=backend,
                        world_rank=i,
                        world_size=len(worker_group),
                        url=url,
                        timeout_s=backend_config.timeout_s,
                    )
                    for i in range(len(worker_group))
                ]
            )

        def on_shutdown(self, worker_group: Any, backend_config: Any) -> None:
            worker_group.execute(destroy_group)
            store_file = getattr(self, "store_file", None)
            if store_file is not None:
                store_file.unlink(missing_ok=True)

    @_dataclass
    class FileRendezvousTorchConfig(TorchConfig):
        store_dir: str = ""

        @property
        def backend_cls(self) -> type[Backend]:
            return FileRendezvousBackend

    return FileRendezvousTorchConfig(store_dir=store_dir)


# ---------------------------------------------------------------------------------------------
# The pipeline stage: teacher export + student export + calibration data -> distilled student

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
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


def run_stage(config: DistillStageConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Distill the student export toward the teacher export on calibration blocks.

    ``inputs``: ``teacher``: an export artifact of the *original* model (``teacher/model``);
    ``student``: an export artifact of the compressed winner (``student/model``); ``data``: the
    data artifact (``calib.parquet``); optionally ``overlay``: the winner's overlay directory, whose
    skipped layers map student layers to the teacher layers they came from (needed when layers
    were dropped). Checkpoints go to ``out_dir/checkpoints``, so an attempt killed mid-way resumes
    from the last one when the stage runs again in the same ``out_dir``; they are removed once
    ``out_dir/model`` (a Hugging Face checkpoint in the student export's form) is written.
    """
    from stages.data import read_calib
    from stages.export import TIES_FILE, load_export

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

    teacher = load_export(teacher_dir, dtype=torch.float32)
    student = load_export(student_dir, dtype=torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_t = int(teacher.config.num_hidden_layers)
    n_s = int(student.config.num_hidden_layers)
    skipped = _skipped_layers(overlay_dir)
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
        changed = _patched_layers(overlay_dir)
        train = train.model_copy(update={"train_layers": [j for j, i in enumerate(kept) if i in changed]})
    blocks = read_calib(data_dir)[: config.max_blocks]
    n_batches = len(blocks) // train.micro_batch
    if n_batches == 0:
        raise InputError(
            f"{len(blocks)} calibration blocks (max_blocks={config.max_blocks}) are fewer than "
            f"one micro-batch of {train.micro_batch}"
        )
    blocks = blocks[: n_batches * train.micro_batch]
    vocab = min(int(m.get_input_embeddings().num_embeddings) for m in (teacher, student))
    if int(blocks.max()) >= vocab:
        raise InputError(
            f"calibration token id {int(blocks.max())} is outside the models' vocabulary ({vocab})"
        )
    batches = [
        torch.from_numpy(blocks[i * train.micro_batch : (i + 1) * train.micro_batch].copy())
        for i in range(n_batches)
    ]

    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    result = distill(
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

    if config.dtype == "auto":
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(student_dir), "dtype", None)
        if isinstance(stored, torch.dtype):
            out_dtype = stored
        else:
            out_dtype = _OUT_DTYPES.get(str(stored).removeprefix("torch."), torch.float32)
    else:
        out_dtype = _OUT_DTYPES[config.dtype]
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
        "tokens": result.steps_done * train.grad_accum * train.micro_batch * block,
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


def _skipped_layers(overlay_dir: Path | None) -> set[int]:
    if overlay_dir is None:
        return set()
    layers = json.loads((overlay_dir / "overlay.json").read_text()).get("layers", {})
    return {int(i) for i, entry in layers.items() if entry.get("skip")}


def _patched_layers(overlay_dir: Path) -> set[int]:
    layers = json.loads((overlay_dir / "overlay.json").read_text()).get("layers", {})
    return {int(i) for i, entry in layers.items() if entry.get("patch")}


def write_overlay(student: nn.Module, trained: set[str], winner_dir: Path, out_dir: Path, kept: list[int],
                  dtype: torch.dtype) -> bool:
    """Write the trained student as an overlay on the winner's base shard at ``out_dir``
    (``overlay.json`` and ``ff/`` patches, in the form the compress stage writes): every layer the
    winner patched or training moved gets a patch of its trained tensors (cut back to the winner's
    shapes: export padding is zero neurons, and stays zero under training), tied windows one patch
    each, skipped layers stay skipped. Returns False, writing nothing, when training moved
    parameters outside the decoder layers (embeddings, final norm): no overlay can hold those."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from stages.artifacts import write_atomic, write_json_atomic
    from stages.checkpoint import SAFETENSORS_DTYPES
    from stages.families import family_for

    if any(layer_index(n) is None for n in trained):
        return False
    meta = json.loads((winner_dir / "overlay.json").read_text())
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
    group_of: dict[int, tuple[int, ...]] = {}
    refs: dict[int, dict[str, Tensor]] = {}
    for i, entry in meta["layers"].items():
        if entry.get("patch"):
            group_of[int(i)] = tuple(entry.get("tied") or [int(i)])
            with safe_open(str(winner_dir / entry["patch"]), framework="pt") as f:
                refs[int(i)] = {k: f.get_slice(k) for k in f.keys()}
    layers: dict[str, dict] = {str(i): {"skip": True} for i, e in meta["layers"].items() if e.get("skip")}
    written: dict[tuple[int, ...], str] = {}
    for i in sorted(set(refs) | set(moved)):
        g = group_of.get(i, (i,))
        if g not in written:
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
            name = f"ff/L{g[0]:05d}" + (f"-{g[-1]:05d}" if len(g) > 1 else "") + ".safetensors"
            write_atomic(out_dir / name, lambda p, t=patch: save_file(t, str(p)))
            written[g] = name
        layers[str(i)] = {"patch": written[g], "tied": list(g) if len(g) > 1 else None}
    write_json_atomic(out_dir / "overlay.json", {"layers": layers, "tied": [list(g) for g in meta.get("tied", [])]})
    return True


def _write_student(
    student: nn.Module, student_dir: Path, model_dir: Path, dtype: torch.dtype, *, tied: bool
) -> None:
    """Write ``student`` at ``model_dir`` in the form of ``student_dir``: stock
    (``save_pretrained``, safetensors) or the export's tied form (the same tensor names stored,
    ``mlpfuse_ties.json`` copied). Tokenizer files and the model card are copied from
    ``student_dir``. Written beside and renamed into place, so a half-written model never stays."""
    from stages.export import EXTRA_TOKENIZER_FILES, TIES_FILE, TIED_STEM, ShardWriter, parse_size
    from stages.shard import TOKENIZER_FILES

    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.to(dtype)
    student.config.dtype = dtype
    if not tied:
        student.save_pretrained(tmp, max_shard_size="2GB")
    else:
        from safetensors import safe_open
        from transformers import AutoConfig

        spec = json.loads((student_dir / TIES_FILE).read_text())
        weights = spec["weights"]
        if weights.endswith(".index.json"):
            index = json.loads((student_dir / weights).read_text())
            files = sorted(set(index["weight_map"].values()))
        else:
            files = [weights]
        names: list[str] = []
        for f in files:
            with safe_open(str(student_dir / f), framework="pt") as h:
                names.extend(h.keys())
        state = student.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"tied export tensors {missing[:5]} are not in the loaded student")
        cfg = AutoConfig.from_pretrained(student_dir)
        cfg.dtype = dtype
        cfg.save_pretrained(tmp)
        writer = ShardWriter(tmp, TIED_STEM, parse_size("2GB"))
        for name in sorted(names):
            t = state[name].detach().cpu()
            writer.add(name, t.to(dtype) if t.is_floating_point() else t)
        written = writer.close(
            sum(p.numel() for p in student.parameters()),
            mode=(tmp / "config.json").stat().st_mode & 0o777,
        )
        spec["weights"] = f"{TIED_STEM}.safetensors" + ("" if len(written) == 1 else ".index.json")
        (tmp / TIES_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    for name in (*TOKENIZER_FILES, *EXTRA_TOKENIZER_FILES, "README.md"):
        if (student_dir / name).exists() and not (tmp / name).exists():
            shutil.copy2(student_dir / name, tmp / name)
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
