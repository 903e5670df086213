"""The artifact store: content-addressed, verified, safe to share between concurrent runs.

Layout under the store root::

    artifacts/<stage>/<key>/        finished artifacts; manifest.json is written last
    staging/<stage>-<key>/          work in progress; kept across crashes so a stage resumes
    locks/<key>.lock                held while a key is being computed
    quarantine/                     artifacts that failed verification, kept for inspection
    store.json                      the store's identity: a node that reads another (or none) at
                                    the same path does not share this store's disk

An artifact exists only if its ``manifest.json`` parses and every file it lists has the recorded
size and sha256. A staging directory becomes an artifact by one ``rename``, so readers never see
half an artifact, and two runs computing the same key serialise on its lock: the second finds the
first one's artifact and reports a cache hit.

Remote stores (``s3://``, ``gs://``, ``hdfs://``, ``abfs://`` through pyarrow.fs; any other fsspec
protocol through fsspec) keep ``artifacts/`` and ``quarantine/`` at the URI. Stages still read and
write local paths: a local working directory (``$MLPFUSE_MIRROR/<sha of uri>/``, by default under
``~/.cache/mlpfuse/remote``) holds ``staging/``, ``locks/`` and a read-through mirror of
``artifacts/``. Object stores have no atomic directory rename, so a commit uploads every file and
``manifest.json`` last: a remote artifact exists iff its manifest does, and files left without one
by a crash are ignored by readers and overwritten by the next commit. A stage whose resumable
state must outlive its node (distillation's checkpoints) also saves it at the URI, under
``staging/<stage>-<key>/`` with ``state.json`` last (``save_state``), and a task on any node
restores it from there (``restore_state``); the commit deletes it.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
from filelock import FileLock

from mlpfuse.core.artifacts import StateSync, file_digest, fsync_dir, write_json_atomic
from mlpfuse.core.errors import InputError

log = logging.getLogger("mlpfuse.store")

MANIFEST = "manifest.json"
IDENTITY = "store.json"
STATE = "state.json"  # a running stage's saved state, in a remote store's staging/<stage>-<key>/
MIRROR_ENV = "MLPFUSE_MIRROR"  # where remote stores keep their local working directories
_CHUNK = 8 << 20


def cache_key(stage: str, version: int, config: dict[str, Any], input_keys: dict[str, str]) -> str:
    """Hash of stage name, stage version, config and the input artifacts' keys."""
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "inputs": input_keys},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_used(path: Path) -> float:
    """When a local artifact was last committed or used (``get`` with ``verify`` touches it)."""
    try:
        return max(path.stat().st_mtime, (path / MANIFEST).stat().st_mtime)
    except OSError:
        return 0.0


def _file_problem(f: Path, rel: str, info: dict[str, Any]) -> str | None:
    """Why file ``f`` (listed as ``rel``) does not match its manifest entry, or None."""
    if not f.exists():
        return f"{rel} is missing"
    if f.stat().st_size != info["size"]:
        return f"{rel} has {f.stat().st_size} bytes, manifest says {info['size']}"
    if file_digest(f) != info["sha256"]:
        return f"{rel} fails its checksum"
    return None


def store_identity(local_dir: str | os.PathLike[str]) -> str | None:
    """The id of the local store at ``local_dir`` as this machine sees it, or None (no store
    there). Reads only: a node checking whether it shares a store's disk creates nothing."""
    try:
        return str(json.loads((Path(local_dir) / IDENTITY).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]


# What a remote store's client reads from the environment (endpoint, region, credentials). A
# driver's settings reach the run's tasks through Ray's runtime_env (see ``client_env``), so a
# cluster joined by address reaches the same store as the driver that checked it.
CLIENT_ENV_VARS: tuple[str, ...] = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
)


def client_env() -> dict[str, str]:
    """The remote-store client settings this process has (those of :data:`CLIENT_ENV_VARS` set)."""
    return {k: os.environ[k] for k in CLIENT_ENV_VARS if k in os.environ}


class StoreUnreachable(InputError):
    """The remote store cannot be reached (or its bucket does not exist): nothing was run."""


class _Remote:
    """Paths relative to a remote store's base, on a pyarrow filesystem (fsspec-backed for schemes
    pyarrow does not know, e.g. ``memory://``)."""

    def __init__(self, uri: str):
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except pa.ArrowInvalid:  # unknown to pyarrow: any fsspec protocol
            fs, base = fsspec.core.url_to_fs(uri)
            self.fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        self.base = base.rstrip("/")
        try:  # one metadata request: an unreachable server or a missing bucket fails here, at once
            bucket = self.base.split("/")[0]
            missing = (isinstance(self.fs, (pafs.S3FileSystem, pafs.GcsFileSystem))
                       and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound)
        except OSError as e:
            raise StoreUnreachable(f"cannot reach the artifact store {uri}: {e}. Check the endpoint "
                                   "(AWS_ENDPOINT_URL), the credentials and that the bucket exists") from None
        if missing:
            raise StoreUnreachable(f"the artifact store {uri}: bucket {bucket!r} does not exist")

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def read(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def create_dirs(self, rel: str, names: Iterable[str]) -> None:
        """``rel`` and the folders of ``rel/<name>`` for every name (object stores without folders
        ignore it)."""
        for d in sorted({posixpath.dirname(f"{rel}/{name}") for name in names} | {rel}):
            self.fs.create_dir(self.path(d), recursive=True)

    def upload(self, src: Path, rel: str) -> None:
        with open(src, "rb") as s, self.fs.open_output_stream(self.path(rel)) as d:
            shutil.copyfileobj(s, d, _CHUNK)

    def download(self, rel: str, dst: Path) -> None:
        with self.fs.open_input_stream(self.path(rel)) as s, open(dst, "wb") as d:
            shutil.copyfileobj(s, d, _CHUNK)

    def dirs(self, rel: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete(self, rel: str, *, tree: bool = False) -> None:
        try:
            (self.fs.delete_dir if tree else self.fs.delete_file)(self.path(rel))
        except FileNotFoundError:
            pass


class ArtifactStore:
    """A store at a local (or shared-mount) directory, or at a remote URI. Use one root for every
    run that should share results; for a cluster, a directory every node mounts (NFS, a PVC) or an
    object-store URI (``s3://bucket/mlpfuse``).

    ``root`` is the directory (a Path), or the URI as given (a str; ``ArtifactStore(str(root))``
    reopens the same store, as Ray tasks do); ``local`` is the local directory holding staging,
    locks and artifact files (``root`` itself for a local store). With a remote store, ``lock``
    serialises runs on one machine only: across nodes the store is best-effort. Two nodes may both
    compute a key; a commit that finds a manifest already there keeps it, and otherwise both upload
    the same key's files and write the manifest last, so readers see one complete artifact (a file
    that does not match the manifest read is treated as missing, never returned)."""

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        self.remote: _Remote | None = None
        if "://" in root and not root.startswith("file://"):
            scheme, rest = root.split("://", 1)
            uri = f"{scheme}://{rest.rstrip('/')}"
            self.root: Path | str = uri
            self.remote = _Remote(uri)
            mirror = Path(os.environ.get(MIRROR_ENV) or "~/.cache/mlpfuse/remote").expanduser()
            self.local = mirror.resolve() / hashlib.sha256(uri.encode()).hexdigest()[:16]
        else:
            self.root = self.local = Path(root.removeprefix("file://")).expanduser().resolve()
        for sub in ("artifacts", "staging", "locks", "quarantine"):
            (self.local / sub).mkdir(parents=True, exist_ok=True)
        self.identity = self._identity()

    def _identity(self) -> str | None:
        """A local store's id (made once, by whichever run opens it first), which lets a node check
        with :func:`store_identity` that it sees the same directory. Remote stores: None (every
        node reaches the URI; each keeps its own mirror)."""
        if self.remote is not None:
            return None
        path = self.local / IDENTITY
        if not path.exists():
            tmp = path.with_name(f".{IDENTITY}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"id": uuid.uuid4().hex}))
            try:
                os.link(tmp, path)  # atomic and exclusive: two runs opening a new store agree
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return store_identity(self.local)

    def location(self, stage: str, key: str) -> str:
        """Where the artifact lives, as every node names it (the URI for remote stores)."""
        if self.remote is not None:
            return f"{self.root}/artifacts/{stage}/{key}"
        return str(self.artifact_dir(stage, key))

    # ----- paths -------------------------------------------------------------------------
    def artifact_dir(self, stage: str, key: str) -> Path:
        """Where the artifact's files are (remote stores: the local mirror)."""
        return self.local / "artifacts" / stage / key

    def staging_dir(self, stage: str, key: str) -> Path:
        return self.local / "staging" / f"{stage}-{key}"

    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        with FileLock(str(self.local / "locks" / f"{key}.lock"), timeout=timeout):
            yield

    # ----- read ------------------------------------------------------------------------------
    def get(self, stage: str, key: str, *, verify: bool = True) -> Artifact | None:
        """The finished artifact, or None. A corrupt one is quarantined and reported as missing.
        Remote stores: ``verify`` also brings every file into the local mirror (downloading what is
        missing or wrong); without it, only the manifest is read and ``path`` may be incomplete."""
        if self.remote is not None:
            return self._get_remote(stage, key, verify)
        path = self.artifact_dir(stage, key)
        mpath = path / MANIFEST
        if not mpath.exists():
            return None
        problem = None
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as e:
            problem, manifest = f"unreadable manifest ({e})", {}
        if problem is None and verify:
            problem = self._check(path, manifest)
        if problem is not None:
            log.warning("artifact %s fails verification (%s): quarantined, to be recomputed", path, problem)
            self._quarantine(path, problem)
            return None
        if verify:
            try:
                os.utime(path)  # last used, for ``mlpfuse gc --older-than``
            except OSError:
                pass
        return Artifact(stage, key, path, manifest)

    def _check(self, path: Path, manifest: dict[str, Any]) -> str | None:
        inside = self.local.resolve()
        if path.is_symlink() or not path.resolve().is_relative_to(inside):
            return f"{path} is a link out of the store"
        for rel, info in manifest.get("files", {}).items():
            f = path / rel
            if f.is_symlink() or not f.resolve().is_relative_to(inside):
                return f"{rel} is a link out of the store (the store never follows links)"
            if (problem := _file_problem(path / rel, rel, info)) is not None:
                return problem
        return None

    def _get_remote(self, stage: str, key: str, verify: bool) -> Artifact | None:
        assert self.remote is not None
        rel = f"artifacts/{stage}/{key}"
        raw = self.remote.read(f"{rel}/{MANIFEST}")
        if raw is None:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            self._quarantine_remote(stage, key, raw, f"unreadable manifest ({e})")
            return None
        path = self.artifact_dir(stage, key)
        if verify:
            # Files this mirror downloaded (or committed) for this very manifest were checked then;
            # they are re-checked by size, not re-hashed on every use.
            trusted = _read_json(path / MANIFEST) == manifest
            for name, info in manifest.get("files", {}).items():
                f = path / name
                if trusted and f.exists() and f.stat().st_size == info["size"]:
                    continue
                if _file_problem(f, name, info) is None:
                    continue
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f".{f.name}.download-{os.getpid()}")
                try:
                    self.remote.download(f"{rel}/{name}", tmp)
                except FileNotFoundError:
                    pass  # reported as missing below
                if (problem := _file_problem(tmp, name, info)) is not None:
                    tmp.unlink(missing_ok=True)
                    log.warning("artifact %s/%s/%s in %s fails verification (%s): quarantined, to be "
                                "recomputed", "artifacts", stage, key, self.root, problem)
                    self._quarantine_remote(stage, key, raw, problem)
                    return None
                os.replace(tmp, f)
            write_json_atomic(path / MANIFEST, manifest)
        return Artifact(stage, key, path, manifest)

    def _quarantine_remote(self, stage: str, key: str, raw: bytes, why: str) -> None:
        """Record why (with the manifest) under quarantine/, then delete the artifact: manifest
        first, so it stops existing at once. The bytes are not kept (a copy costs as much)."""
        assert self.remote is not None
        rel = f"artifacts/{stage}/{key}"
        if self.remote.read(f"{rel}/{MANIFEST}") != raw:
            return  # replaced or removed meanwhile by another run: not the artifact found corrupt
        dest = f"quarantine/{stage}-{key}-{int(time.time() * 1000)}"
        self.remote.write(f"{dest}/{MANIFEST}", raw)
        self.remote.write(f"{dest}/QUARANTINED", (why + "\n").encode())
        self.remote.delete(f"{rel}/{MANIFEST}")
        self.remote.delete(rel, tree=True)
        shutil.rmtree(self.artifact_dir(stage, key), ignore_errors=True)

    def _quarantine(self, path: Path, why: str) -> None:
        stamp = int(time.time() * 1000)
        dest = self.local / "quarantine" / f"{path.parent.name}-{path.name}-{stamp}"
        try:
            os.rename(path, dest)
            (dest / "QUARANTINED").write_text(why + "\n")
        except OSError:
            pass  # another run moved it first

    def list(self) -> list[Artifact]:
        """Every artifact whose manifest parses (nothing is downloaded)."""
        if self.remote is not None:
            r = self.remote
            names = [(s, k) for s in r.dirs("artifacts") for k in r.dirs(f"artifacts/{s}")]
        else:
            top = sorted((self.local / "artifacts").iterdir())
            names = [(s.name, d.name) for s in top for d in sorted(s.iterdir())]
        return [a for s, k in names if (a := self.get(s, k, verify=False)) is not None]

    def unreachable(self, versions: dict[str, int], *, older_than_s: float | None = None) -> builtins.list[Artifact]:
        """Artifacts no run can hit again: a stage that is gone or at another version (``versions``,
        stage name -> current version), or an input that is itself unreachable or missing. With
        ``older_than_s``, also every artifact not used (committed or hit) for that long."""
        arts = {a.key: a for a in self.list()}
        memo: dict[str, bool] = {}

        def dead(key: str) -> bool:
            if key not in memo:
                a = arts.get(key)
                memo[key] = True  # a cycle (impossible for content keys) counts as dead
                memo[key] = (a is None or versions.get(a.stage) != a.manifest.get("stage_version")
                             or any(dead(k) for k in a.manifest.get("inputs", {}).values()))
            return memo[key]

        now = time.time()
        out = []
        for key, a in arts.items():
            idle = self.remote is None and older_than_s is not None and now - _last_used(a.path) > older_than_s
            if dead(key) or idle:
                out.append(a)
        return out

    # ----- write -----------------------------------------------------------------------------
    def commit(self, stage: str, key: str, staging: Path, manifest: dict[str, Any]) -> Artifact:
        """Checksum every file in ``staging``, write the manifest last, rename into place (remote
        stores: upload every file, then the manifest, then move ``staging`` into the mirror)."""
        files = {}
        for f in sorted(staging.rglob("*")):
            if not f.is_file() or f.relative_to(staging).parts[0] == ".parts":
                continue  # part markers stay until the rename: a failed commit still resumes
            if f.name.startswith("."):  # temporaries of an interrupted attempt, never artifact content
                f.unlink()
                continue
            rel = f.relative_to(staging).as_posix()
            if rel != MANIFEST:
                files[rel] = {"size": f.stat().st_size, "sha256": file_digest(f)}
        manifest = {**manifest, "stage": stage, "key": key, "files": files}
        write_json_atomic(staging / MANIFEST, manifest)
        dest = self.artifact_dir(stage, key)
        if self.remote is not None:
            if (theirs := self.get(stage, key)) is not None:  # another node committed: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
                return theirs
            rel = f"artifacts/{stage}/{key}"
            self.remote.create_dirs(rel, files)
            for name in [*files, MANIFEST]:  # the manifest last: from then on the artifact exists
                self.remote.upload(staging / name, f"{rel}/{name}")
            self.remote.delete(f"staging/{stage}-{key}", tree=True)  # its saved state: done with
            shutil.rmtree(dest, ignore_errors=True)  # a stale mirror: the remote is the truth
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, dest)
        except OSError:
            if (dest / MANIFEST).exists():  # committed by a concurrent run: keep theirs
                shutil.rmtree(staging, ignore_errors=True)
            else:
                raise
        fsync_dir(dest.parent)
        shutil.rmtree(dest / ".parts", ignore_errors=True)
        return Artifact(stage, key, dest, manifest)

    # ----- resumable state of a stage in progress (remote stores) ------------------------------

    def save_state(self, stage: str, key: str, src: Path, files: builtins.list[str]) -> None:
        """Upload a running stage's resumable state (``files`` under ``src``, commit point last) to
        the remote store's ``staging/<stage>-<key>/``: files not already there first, then
        ``state.json`` (their order, sizes and sha256), then the previous state's other files are
        deleted. A crash leaves the last complete state readable, except while a file both states
        name (the progress record) is being replaced: that state then fails its checksum on restore
        and the stage starts over. Local stores keep staging on their own disk: nothing to do."""
        if self.remote is None:
            return
        rel = f"staging/{stage}-{key}"
        old = self._state(stage, key) or {}
        info = {name: {"size": (src / name).stat().st_size, "sha256": file_digest(src / name)} for name in files}
        self.remote.create_dirs(rel, files)
        for name in files:
            if old.get(name) != info[name]:
                self.remote.upload(src / name, f"{rel}/{name}")
        self.remote.write(f"{rel}/{STATE}", json.dumps({"files": info}).encode())
        for name in set(old) - set(info):
            self.remote.delete(f"{rel}/{name}")

    def restore_state(self, stage: str, key: str, dest: Path) -> bool:
        """Download the state :meth:`save_state` kept into ``dest``, each file verified and moved
        into place in the saved order (the commit point last). False when there is none, or when a
        file fails verification (logged; the stage then starts over)."""
        if self.remote is None or (files := self._state(stage, key)) is None:
            return False
        rel = f"staging/{stage}-{key}"
        tmp = dest.parent / f".{dest.name}.restore-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name, info in files.items():
                if posixpath.isabs(name) or ".." in name.split("/"):
                    raise ValueError(f"{name} is outside the state's directory")
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                self.remote.download(f"{rel}/{name}", tmp / name)
                if (problem := _file_problem(tmp / name, name, info)) is not None:
                    raise ValueError(problem)
        except (OSError, ValueError) as e:
            log.warning("the saved state of %s %s in %s is unusable (%s): starting over", stage, key, self.root, e)
            return False
        else:
            for name in files:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, dest / name)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _state(self, stage: str, key: str) -> dict[str, Any] | None:
        assert self.remote is not None
        raw = self.remote.read(f"staging/{stage}-{key}/{STATE}")
        try:
            files = json.loads(raw)["files"] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None
        return files if isinstance(files, dict) else None

    def state_sync(self, stage: str, key: str) -> StateSync | None:
        """The :class:`StateSync` of a task computing ``stage``/``key`` (None for local stores)."""
        return None if self.remote is None else _StoreState(self, stage, key)

    def remove(self, stage: str, key: str) -> None:
        """Forget an artifact (``--force``): moved aside, then deleted (remote: manifest first)."""
        if self.remote is not None:
            self.remote.delete(f"artifacts/{stage}/{key}/{MANIFEST}")
            self.remote.delete(f"artifacts/{stage}/{key}", tree=True)
            shutil.rmtree(self.artifact_dir(stage, key), ignore_errors=True)
            return
        path = self.artifact_dir(stage, key)
        if path.exists():
            trash = self.local / "quarantine" / f"forced-{stage}-{key}-{int(time.time() * 1000)}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class _StoreState:
    """A task's :class:`StateSync`: its stage's state in its store's remote staging."""

    store: ArtifactStore
    stage: str
    key: str

    def save(self, src: Path, files: list[str]) -> None:
        self.store.save_state(self.stage, self.key, src, files)

    def restore(self, dest: Path) -> bool:
        return self.store.restore_state(self.stage, self.key, dest)
