"""distill: layer-wise distillation of a compressed student against the original model.

The student (the compressed winner) learns to reproduce the teacher's (the original model's)
hidden state after every decoder layer::

    loss = mean_l MSE(h_student[l], h_teacher[l])  +  lm_loss_weight * LM loss(student)

where ``h[l]`` for l = 1..L are the ``output_hidden_states`` entries after each decoder layer
(entry 0, the embeddings, is left out; for Llama-style models the last entry is after the final
norm). Training runs in a real DeepSpeed engine with ZeRO stage 0, 2 or 3, one process per
worker: :func:`distill` on this machine (world size 1, gloo on CPU or one GPU),
:func:`ray_train_distill` on a Ray cluster through Ray Train (one GPU per worker). Both run the same
per-worker function, so what is tested locally is what runs on the cluster.

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
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    layer_loss: Literal["mse"] = "mse"
    # "ff": only the feed-forward sublayers move (the parameters compression changed);
    # "all": every parameter of the student.
    trainable: Literal["ff", "all"] = "ff"
    checkpoint_every: int = Field(ge=1)
    seed: int
    # Keep fp32 master weights and Adam moments in host memory (ZeRO 2/3 only).
    offload_optimizer: bool = False
    # bfloat16 forward/backward with fp32 master weights (GPU workers).
    bf16: bool = False

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown distill settings {unknown}; known: {sorted(cls.model_fields)}"
                )
        return data

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
    (None for a fresh run)."""

    losses: list[float]
    steps_done: int
    resumed_from: int | None


# ---------------------------------------------------------------------------------------------
# Public entry points


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    batches: list[Tensor],
    config: DistillConfig,
    checkpoint_dir: Path,
    progress: bool = True,
) -> DistillResult:
    """Distill ``student`` toward the frozen ``teacher`` in this process; ``student`` is trained in
    place.

    ``batches``: token ids, each [micro_batch, T]; step s, micro-step j uses
    ``batches[(s * grad_accum + j) % len(batches)]``. Checkpoints go to ``checkpoint_dir`` every
    ``config.checkpoint_every`` steps and at the end; a re-run with the same directory resumes
    from the last complete one. Uses the caller's torch.distributed process group if there is one
    (world size 1 expected), else creates a loopback-only one for the call (gloo, file rendezvous)
    and destroys it at the end.
    """
    _check_models(student, teacher, config)
    _check_batches(batches, config)
    with _local_process_group():
        return _distill_worker(
            student, teacher, batches, config, Path(checkpoint_dir), progress=progress
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
    """
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _check_models(student, teacher, config)
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


def layer_mse(student_hidden: tuple[Tensor, ...], teacher_hidden: tuple[Tensor, ...]) -> Tensor:
    """Mean over decoder layers of the MSE between hidden states, each [b, T, H]; entry 0 (the
    embeddings) is skipped. Computed in float32 whatever the models' dtype."""
    if student_hidden is None or teacher_hidden is None:
        raise RuntimeError("a model returned no hidden states for output_hidden_states=True")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden) - 1} layers, teacher {len(teacher_hidden) - 1}: "
            "layer-wise distillation needs the same number of layers"
        )
    per_layer = [
        F.mse_loss(s.float(), t.float())
        for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)
    ]
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
) -> DistillResult:
    """Train ``student`` in place; the process group must exist. ``on_checkpoint(steps_done,
    losses)`` is called on every worker after each checkpoint (Ray Train reports from it)."""
    _prepare_deepspeed_env()
    import deepspeed
    from tqdm.auto import tqdm

    from cluster.zero import fit_buckets, zero_config

    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _batches_fingerprint(batches)
    saved = _read_progress(checkpoint_dir, config, fingerprint, world)
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
    trainable = ff_parameter_names(student) if config.trainable == "ff" else set(requires_grad)
    if not trainable:
        raise ValueError(
            f"trainable='ff' found no feed-forward parameters in {type(student).__name__}: no module "
            f"named {sorted(FF_MODULE_NAMES)} (or BERT's FF output); use trainable='all'"
        )
    # ZeRO-3 partitions the module's parameters and bf16 casts them: both would leave the caller's
    # model unusable, so those engines train a copy whose fp32 weights are copied back at the end.
    in_place = config.zero_stage != 3 and not config.bf16
    engine: Any = None
    losses: list[float] = []
    start = 0
    resumed_from: int | None = None
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

        bar = tqdm(
            total=config.steps, initial=start, desc="distill", disable=not progress or rank != 0
        )
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), bar:
            for step in range(start, config.steps):
                torch.manual_seed(_step_seed(config.seed, step, rank))
                step_loss = torch.zeros((), device=device, dtype=torch.float32)
                for micro in range(config.grad_accum):
                    index = ((step * config.grad_accum + micro) * world + rank) % len(batches)
                    ids = batches[index].to(device)
                    loss = _distill_loss(engine, teacher, ids, config.lm_loss_weight)
                    engine.backward(loss)
                    engine.step()
                    step_loss += loss.detach().float()
                if world > 1:
                    torch.distributed.all_reduce(step_loss)
                losses.append(step_loss.item() / (config.grad_accum * world))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                done = step + 1
                if done % config.checkpoint_every == 0 or done == config.steps:
                    _save_checkpoint(
                        engine, checkpoint_dir, config, fingerprint, world, done, losses, rank
                    )
                    if on_checkpoint is not None:
                        on_checkpoint(done, losses)

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
    return DistillResult(losses=losses, steps_done=len(losses), resumed_from=resumed_from)


def _distill_loss(engine: Any, teacher: nn.Module, ids: Tensor, lm_loss_weight: float) -> Tensor:
    """The loss of one micro-batch ``ids`` [b, T]."""
    with torch.no_grad():
        teacher_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    if lm_loss_weight == 0:  # no labels argument: encoder-only models take none
        out = engine(input_ids=ids, output_hidden_states=True)
        return layer_mse(out.hidden_states, teacher_hidden)
    out = engine(input_ids=ids, labels=ids, output_hidden_states=True)
    return layer_mse(out.hidden_states, teacher_hidden) + lm_loss_weight * out.loss.float()


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
        }
        _write_json_atomic(checkpoint_dir / PROGRESS_FILE, record)
        for old in checkpoint_dir.glob(f"{_TAG_PREFIX}*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def _read_progress(
    checkpoint_dir: Path, config: DistillConfig, fingerprint: str, world: int
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


def _check_models(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
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
    for key in ("hidden_size", "num_hidden_layers"):
        s, t = getattr(student.config, key, None), getattr(teacher.config, key, None)
        if s != t:
            raise ValueError(
                f"student {key}={s} differs from teacher {key}={t}: layer-wise MSE needs them equal"
            )


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
    )
    metrics = {
        "steps_done": result.steps_done,
        "loss": result.losses[-1],
        "losses": result.losses,
        "resumed_from": result.resumed_from,
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
