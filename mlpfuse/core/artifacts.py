"""Files a stage writes: atomic writes, checksums, and per-part commits for mid-stage resume.

A stage writes into its staging directory. Long stages commit each finished unit of work (a
layer, a window, a candidate) as a *part*: the file is written to a temporary name, fsynced and
renamed, then a small ``.parts/<name>.json`` marker with its size and CRC-32 is written the same
way (against torn and corrupted files; twice as fast as sha256 here, which the finished
artifact's manifest keeps). A part counts as done only when its marker exists and the file still
matches it, so a crash at any moment leaves either a finished part or nothing that is trusted.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    # hashlib reads into one small reused buffer: no fresh 8 MB chunk (and its page faults) per read.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _crc32(path: Path) -> str:
    crc, buf = 0, memoryview(bytearray(1 << 18))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(buf[:n], crc)
    return f"{crc:08x}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` then rename the finished file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def _marker(out_dir: Path, rel: str) -> Path:
    return out_dir / ".parts" / (rel.replace("/", "__") + ".json")


def part_done(out_dir: Path, rel: str) -> bool:
    """True when part ``rel`` was committed and its file still matches the marker."""
    marker = _marker(out_dir, rel)
    target = out_dir / rel
    if not marker.exists() or not target.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("size") == target.stat().st_size and info.get("crc32") == _crc32(target)


def commit_part(out_dir: Path, rel: str, writer: Callable[[Path], Any], meta: dict | None = None) -> None:
    """Write part ``rel`` atomically, then its marker (last)."""
    target = out_dir / rel
    write_atomic(target, writer)
    write_json_atomic(
        _marker(out_dir, rel),
        {"size": target.stat().st_size, "crc32": _crc32(target), **(meta or {})},
    )


def part_meta(out_dir: Path, rel: str) -> dict:
    return json.loads(_marker(out_dir, rel).read_text())


def save_safetensors(tensors: Mapping[str, Any], path: Path) -> None:
    """``tensors`` as a safetensors file at ``path`` (the writer for :func:`write_atomic` and
    :func:`commit_part`: ``partial(save_safetensors, tensors)``)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path))


# ----- resumable state kept in the store while a stage runs ---------------------------------------


class StateSync(Protocol):
    """Where a stage's resumable state (its checkpoints) is kept beyond its node: the orchestrator
    installs one for a task whose store is remote (``use_state_sync``), so a stage resumed on
    another node finds the state its last attempt saved."""

    def save(self, src: Path, files: list[str]) -> None:
        """Keep ``files`` (relative to ``src``, in order: the last one is the state's commit point)."""

    def restore(self, dest: Path) -> bool:
        """Write the last saved state into ``dest`` (in its order); False when there is none."""


_SYNC: contextvars.ContextVar[StateSync | None] = contextvars.ContextVar("mlpfuse_state_sync", default=None)


def current_state_sync() -> StateSync | None:
    return _SYNC.get()


@contextmanager
def use_state_sync(sync: StateSync | None) -> Iterator[None]:
    token = _SYNC.set(sync)
    try:
        yield
    finally:
        _SYNC.reset(token)


@contextmanager
def mirrored_state(directory: Path, files_of: Callable[[Path], list[str] | None], *,
                   every_s: float = 10.0) -> Iterator[None]:
    """Keep ``directory``'s resumable state in the task's :class:`StateSync` while the body runs
    (nothing to do without one: a local store's staging lies on its own disk). First, when the
    directory holds no state (``files_of`` returns None) and the store does, it is restored; then a
    thread saves each new complete state (``files_of``: its files in order, commit point last)
    every ``every_s`` seconds, and once more when the body ends, however it ends. A state replaced
    while it was being saved (a newer checkpoint deleted its files) is saved at the next look."""
    sync = current_state_sync()
    if sync is None:
        yield
        return
    restored = files_of(directory) is None and sync.restore(directory)
    if restored:
        log.info("restored the resumable state of %s from the store", directory)
    stop, saved = threading.Event(), [files_of(directory) if restored else None]

    def save() -> None:
        files = files_of(directory)
        if not files or files == saved[0]:
            return
        try:
            sync.save(directory, files)
            saved[0] = files
        except FileNotFoundError:
            pass  # superseded by a newer state mid-save
        except OSError as e:
            log.warning("could not keep the state of %s in the store (%s); will retry", directory, e)

    def loop() -> None:
        while not stop.wait(every_s):
            save()

    thread = threading.Thread(target=loop, name="mlpfuse-state-sync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        save()
