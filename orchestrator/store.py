"""The artifact store: content-addressed, verified, safe to share between concurrent runs.

Layout under the store root::

    artifacts/<stage>/<key>/        finished artifacts; manifest.json is written last
    staging/<stage>-<key>/          work in progress; kept across crashes so a stage resumes
    locks/<key>.lock                held while a key is being computed
    quarantine/                     artifacts that failed verification, kept for inspection

An artifact exists only if its ``manifest.json`` parses and every file it lists has the recorded
size and sha256. A staging directory becomes an artifact by one ``rename``, so readers never see
half an artifact, and two runs computing the same key serialise on its lock: the second finds the
first one's artifact and reports a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stages.artifacts import file_digest, fsync_dir, write_json_atomic

MANIFEST = "manifest.json"


def cache_key(stage: str, version: int, config: dict[str, Any], input_keys: dict[str, str]) -> str:
    """Hash of stage name, stage version, config and the input artifacts' keys."""
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "inputs": input_keys},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]


class ArtifactStore:
    """A local (or shared-mount) directory store. Use one root for every run that should share
    results; for a cluster, a directory every node mounts (NFS, a PVC, a FUSE-mounted bucket)."""

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            raise ValueError(
                f"cache {root!r}: object-store URIs are used through a shared mount; give its local "
                "mount point (e.g. a FUSE-mounted bucket or a PVC path)"
            )
        self.root = Path(root.removeprefix("file://")).expanduser().resolve()
        for sub in ("artifacts", "staging", "locks", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ----- paths -------------------------------------------------------------------------
    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / "artifacts" / stage / key

    def staging_dir(self, stage: str, key: str) -> Path:
        return self.root / "staging" / f"{stage}-{key}"

    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        with FileLock(str(self.root / "locks" / f"{key}.lock"), timeout=timeout):
            yield

    # ----- read ------------------------------------------------------------------------------
    def get(self, stage: str, key: str, *, verify: bool = True) -> Artifact | None:
        """The finished artifact, or None. A corrupt one is quarantined and reported as missing."""
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
            self._quarantine(path, problem)
            return None
        return Artifact(stage, key, path, manifest)

    def _check(self, path: Path, manifest: dict[str, Any]) -> str | None:
        for rel, info in manifest.get("files", {}).items():
            f = path / rel
            if not f.exists():
                return f"{rel} is missing"
            if f.stat().st_size != info["size"]:
                return f"{rel} has {f.stat().st_size} bytes, manifest says {info['size']}"
            if file_digest(f) != info["sha256"]:
                return f"{rel} fails its checksum"
        return None

    def _quarantine(self, path: Path, why: str) -> None:
        dest = self.root / "quarantine" / f"{path.parent.name}-{path.name}-{int(time.time() * 1000)}"
        try:
            os.rename(path, dest)
            (dest / "QUARANTINED").write_text(why + "\n")
        except OSError:
            pass  # another run moved it first

    def list(self) -> list[Artifact]:
        out = []
        for stage_dir in sorted((self.root / "artifacts").iterdir()):
            for d in sorted(stage_dir.iterdir()):
                a = self.get(stage_dir.name, d.name, verify=False)
                if a is not None:
                    out.append(a)
        return out

    # ----- write -----------------------------------------------------------------------------
    def commit(self, stage: str, key: str, staging: Path, manifest: dict[str, Any]) -> Artifact:
        """Checksum every file in ``staging``, write the manifest last, rename into place."""
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

    def remove(self, stage: str, key: str) -> None:
        """Forget an artifact (``--force``): moved aside, then deleted."""
        path = self.artifact_dir(stage, key)
        if path.exists():
            trash = self.root / "quarantine" / f"forced-{stage}-{key}-{int(time.time() * 1000)}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
