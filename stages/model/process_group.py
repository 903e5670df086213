"""Where distillation workers meet: a local gloo process group for a single-process run, and the
environment DeepSpeed reads before it initialises (no MPI discovery, CPU accelerator on CPU)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def prepare_deepspeed_env() -> None:
    # Compiled DeepSpeed ops are cached across runs; without a GPU DeepSpeed must use its CPU
    # accelerator (it would otherwise probe for one and warn).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_TORCH_EXTENSIONS_DIR))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def local_process_group() -> Iterator[None]:
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
                prepare_deepspeed_env()
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


# DeepSpeed op builds (the CPU shared-memory comm op, built at every engine start) are cached here.
DEFAULT_TORCH_EXTENSIONS_DIR = Path("~/.cache/mlpfuse/torch_extensions").expanduser()

