"""The DeepSpeed trainer behind the distill stage: one worker's training loop in a real DeepSpeed
engine (ZeRO 0, 2 or 3), deterministic per (step, micro-step, rank), checkpointed and resumable.
:func:`distill` runs it in this process (world size 1); ``mlpfuse.cluster.ray_train`` runs the
same worker function on every Ray Train worker, so what is tested locally is what runs there.

The loss (``mlpfuse.stages.math.distill_loss``): the student reproduces the teacher's hidden state
after every decoder layer, plain MSE or relative to the teacher's norm per token, plus an optional
LM loss. Determinism and resume: the micro-batch of every (step, micro-step, rank) is fixed by its
index, the RNG is re-seeded from (seed, step, rank) before each step, and a checkpoint holds the
module, the optimizer state and the loss history, so a re-run with the same ``checkpoint_dir``
continues from the last complete checkpoint and ends with the weights an uninterrupted run ends
with (bit-identical on CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mlpfuse.core.errors import InputError
from mlpfuse.stages.math.distill_loss import layer_mse
from mlpfuse.stages.model.process_group import local_process_group, prepare_deepspeed_env
from mlpfuse.stages.model.trainer_checks import check_batches, check_models, check_ties, tied_groups

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# AdamW settings of the client optimizer. Weight decay is off: distillation pulls the student
# toward the teacher, and decay would pull the compressed weights toward zero instead.
ADAMW_BETAS = (0.9, 0.999)


ADAMW_EPS = 1e-8


ADAMW_WEIGHT_DECAY = 0.0


# Names of the modules that are a decoder layer's feed-forward sublayer, across the families in
# mlpfuse.stages.model.families: ``mlp`` (GPT-2 c_fc/c_proj, Llama/Gemma/Qwen and MoE blocks), ``intermediate``
# (BERT's first FF linear), ``fc1``/``fc2`` (OPT). BERT's second FF linear is the ``output`` module
# that sits beside ``intermediate`` (not ``attention.output``); see :func:`ff_parameter_names`.
FF_MODULE_NAMES = frozenset({"mlp", "intermediate", "fc1", "fc2"})


# Files in a checkpoint directory.
PROGRESS_FILE = "progress.json"


_TAG_PREFIX = "step"


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
    layer_map = check_models(student, teacher, config, layer_map)
    check_batches(batches, config)
    with local_process_group():
        return distill_worker(
            student,
            teacher,
            batches,
            config,
            Path(checkpoint_dir),
            progress=progress,
            layer_map=layer_map,
            time_limit_s=time_limit_s,
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


def distill_worker(
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
    ``layer_map``: resolved (a full list, see :func:`check_models`) or None for the identity."""
    started = time.monotonic()
    prepare_deepspeed_env()
    import deepspeed
    from tqdm.auto import tqdm

    from mlpfuse.stages.model.zero import fit_buckets, zero_config

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
    # A teacher kept in its stored precision (the distill stage loads it so) computes in float32
    # one layer at a time: no worker holds a full float32 copy of it.
    lowp = any(p.is_floating_point() and p.dtype != torch.float32 for p in teacher.parameters())
    upcasts = upcast_per_unit(teacher, teacher_units(teacher)) if lowp else []
    ties = tied_groups(student)
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
        for h in upcasts:
            h.remove()
    check_ties(student, ties)
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


def checkpoint_files(checkpoint_dir: Path) -> list[str] | None:
    """The files of the complete checkpoint ``checkpoint_dir`` holds, relative to it, the progress
    JSON that names it last (its commit point), or None when it holds none."""
    try:
        tag = json.loads((checkpoint_dir / PROGRESS_FILE).read_text())["tag"]
        files = sorted(f.relative_to(checkpoint_dir).as_posix() for f in (checkpoint_dir / tag).rglob("*") if f.is_file())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [*files, PROGRESS_FILE] if files else None


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


def upcast_per_unit(model: nn.Module, units: list[nn.Module]) -> list[Any]:
    """Forward passes in float32 over a model whose weights stay in their lower stored precision
    (bf16/fp16): each of ``units`` (its decoder layers, and every module outside them that holds
    parameters: embeddings, final norm, head) is upcast on entry and given back its stored weights
    on exit, so at most one unit is in float32 at a time. The outputs are those of the model
    loaded in float32 (the same upcast values), at half of its memory. Returns the hook handles."""
    handles: list[Any] = []
    held: dict[int, Tensor] = {}

    def enter(module: nn.Module, args: Any) -> None:
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in held:
                held[id(p)] = p.data
                p.data = p.data.float()

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        for p in module.parameters():
            if id(p) in held:
                p.data = held.pop(id(p))

    for unit in units:
        handles.append(unit.register_forward_pre_hook(enter))
        handles.append(unit.register_forward_hook(leave))
    return handles


def teacher_units(model: nn.Module) -> list[nn.Module]:
    """The units :func:`upcast_per_unit` upcasts one at a time: each decoder layer, and each module
    outside the layers that holds parameters of its own."""
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                   and all(type(x) is type(m[0]) for x in m)), None)
    inside = {id(p) for p in layers.parameters()} if layers is not None else set()
    outer = [m for m in model.modules()
             if any(id(p) not in inside for p in m.parameters(recurse=False))]
    return [*(layers or []), *outer]


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


STAGE_VERSION = 1

