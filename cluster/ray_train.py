"""Distillation across workers: the distill stage's DeepSpeed worker loop run on a Ray cluster
through Ray Train's ``TorchTrainer`` (one process per worker, gloo on CPU or NCCL on GPUs). Ray
lives here, at the edge: the trainer itself (``mlpfuse.stages.model.trainer``) imports no Ray."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mlpfuse.stages.model.trainer import DistillConfig, DistillResult, distill_worker
from mlpfuse.stages.model.trainer_checks import check_batches, check_models, check_ties, tied_groups

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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

    layer_map = check_models(student, teacher, config, layer_map)
    check_batches(batches, config)
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
    ties = tied_groups(student)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name in trained:
                param.copy_(trained[name].to(dtype=param.dtype, device=param.device))
    check_ties(student, ties)
    metrics = result.metrics or {}
    return DistillResult(
        losses=[float(x) for x in metrics["losses"]],
        steps_done=int(metrics["steps_done"]),
        resumed_from=metrics["resumed_from"],
        seconds=float(metrics.get("seconds", 0.0)),
        stopped_early=bool(metrics.get("stopped_early", False)),
    )


_FINAL_WEIGHTS = "student.safetensors"


def stage_trainer(num_workers: int, *, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                  max_failures: int = 2) -> Callable[..., DistillResult]:
    """The distill stage's ``train_fn`` for ``num_workers`` Ray Train workers, called inside the
    stage's Ray task. The workers are placed on the task's own node, where the stage's checkpoint
    directory (in its staging directory) lies: every worker writes its ZeRO partition there and a
    restarted worker group (up to ``max_failures`` times) resumes from the last checkpoint. Ray
    Train's TCP rendezvous binds that node's address."""
    import ray

    node = ray.util.get_node_ip_address()
    resources = {"CPU": cpus_per_worker, f"node:{node}": 0.001}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker

    def train(student: PreTrainedModel, teacher: PreTrainedModel, batches: list[Tensor], config: DistillConfig,
              checkpoint_dir: Path, **kw: Any) -> DistillResult:
        return ray_train_distill(student, teacher, batches, config, checkpoint_dir, num_workers=num_workers,
                                 use_gpu=gpus_per_worker > 0, resources_per_worker=resources,
                                 max_failures=max_failures, **kw)

    return train


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

    result = distill_worker(
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

