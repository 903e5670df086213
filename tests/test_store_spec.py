"""Artifact store (atomic, verified, concurrent-safe) and spec validation."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mlpfuse.orchestrator.spec import SpecError, load_spec, parse_spec
from mlpfuse.orchestrator.store import ArtifactStore, cache_key

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def _commit(store: ArtifactStore, key: str, payload: bytes = b"x" * 1000) -> None:
    staging = store.staging_dir("s", key)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "a.bin").write_bytes(payload)
    store.commit("s", key, staging, {"config": {}})


def test_key_depends_on_everything() -> None:
    base = cache_key("shard", 1, {"a": 1}, {"x": "k"})
    assert base == cache_key("shard", 1, {"a": 1}, {"x": "k"})
    assert len({base, cache_key("shard", 2, {"a": 1}, {"x": "k"}), cache_key("shard", 1, {"a": 2}, {"x": "k"}),
                cache_key("shard", 1, {"a": 1}, {"x": "j"}), cache_key("data", 1, {"a": 1}, {"x": "k"})}) == 5


def test_commit_then_get(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.get("s", "k1") is None
    _commit(store, "k1")
    art = store.get("s", "k1")
    assert art is not None and (art.path / "a.bin").read_bytes() == b"x" * 1000
    assert art.manifest["files"]["a.bin"]["size"] == 1000
    assert not store.staging_dir("s", "k1").exists()


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "manifest"])
def test_corrupt_artifact_is_quarantined(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path)
    _commit(store, "k1")
    f = store.artifact_dir("s", "k1") / ("manifest.json" if damage == "manifest" else "a.bin")
    data = bytearray(f.read_bytes())
    if damage == "bitflip":
        data[10] ^= 0x01
    elif damage == "truncate":
        data = data[:500]
    else:
        data = data[:-5]
    f.write_bytes(bytes(data))
    assert store.get("s", "k1") is None
    assert not store.artifact_dir("s", "k1").exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_concurrent_commits_keep_one(tmp_path: Path) -> None:
    """Two writers of the same key, each under the key's lock: exactly one computes."""
    store = ArtifactStore(tmp_path)
    computed = []

    def worker() -> None:
        with store.lock("k"):
            if store.get("s", "k") is None:
                computed.append(1)
                _commit(store, "k")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert computed == [1]
    assert store.get("s", "k") is not None


def test_unknown_key_names_closest() -> None:
    with pytest.raises(SpecError, match=r"unknown key 'modle'.*did you mean 'model'"):
        parse_spec({"modle": "x"})
    with pytest.raises(SpecError, match=r"unknown key 'evaluate.strid'.*did you mean 'stride'"):
        parse_spec({"model": "x", "evaluate": {"strid": 3}})
    with pytest.raises(SpecError, match=r"unknown key 'budget.targt'.*did you mean 'target'"):
        parse_spec({"model": "x", "budget": {"target": {"params": 0.8}, "targt": 1}})
    with pytest.raises(SpecError, match=r"unknown key 'distill.minutz'.*did you mean 'minutes'"):
        parse_spec({"model": "x", "distill": {"train": {}, "max_blocks": 1, "minutz": 3}})


def test_wrong_type_names_value() -> None:
    with pytest.raises(SpecError, match=r"evaluate.window.*'lots'"):
        parse_spec({"model": "x", "evaluate": {"window": "lots"}})


def test_spec_cannot_set_halving_increments() -> None:
    with pytest.raises(SpecError, match=r"after_tokens is set by successive halving"):
        parse_spec({"model": "x", "evaluate": {"after_tokens": 100}})


def test_spec_cannot_name_code() -> None:
    with pytest.raises(SpecError, match="unknown key"):
        parse_spec({"model": "x", "callback": "os.system"})


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "../up"])
def test_a_name_cannot_leave_its_output_folder(name: str) -> None:
    with pytest.raises(SpecError, match="name"):
        parse_spec({"model": "x", "name": name})


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.model


def test_gc_removes_exactly_what_no_run_can_hit(tmp_path: Path) -> None:
    """Stale stage versions and everything downstream of them go; current chains and idle-but-recent
    artifacts stay; ``--older-than`` removes what was not used for that long; a hit counts as use."""
    import os
    import time

    store = ArtifactStore(tmp_path)

    def commit(stage: str, key: str, version: int, inputs: dict[str, str]) -> None:
        staging = store.staging_dir(stage, key)
        staging.mkdir(parents=True)
        (staging / "a.bin").write_bytes(key.encode())
        store.commit(stage, key, staging, {"config": {}, "stage_version": version, "inputs": inputs})

    from mlpfuse.stages.registry import STAGES

    versions = {s.name: s.version for s in STAGES.values()}
    v = versions.__getitem__
    commit("shard", "s1", v("shard"), {})
    commit("compress", "c_old", v("compress") - 1, {"shard": "s1"})
    commit("evaluate", "e_old", v("evaluate"), {"shard": "s1", "overlay": "c_old"})  # its input is stale
    commit("compress", "c_new", v("compress"), {"shard": "s1"})
    commit("evaluate", "e_new", v("evaluate"), {"shard": "s1", "overlay": "c_new"})
    commit("evaluate", "e_orphan", v("evaluate"), {"shard": "gone"})
    commit("retired", "r1", 1, {})
    assert sorted(a.key for a in store.unreachable(versions)) == ["c_old", "e_old", "e_orphan", "r1"]

    week = 7 * 86400
    old = time.time() - 2 * week
    for key, stage in (("c_new", "compress"), ("e_new", "evaluate")):
        os.utime(store.artifact_dir(stage, key), (old, old))
        os.utime(store.artifact_dir(stage, key) / "manifest.json", (old, old))
    assert store.get("compress", "c_new") is not None  # a hit: c_new is used again
    idle = {a.key for a in store.unreachable(versions, older_than_s=week)}
    assert idle == {"c_old", "e_old", "e_orphan", "r1", "e_new"}

    from mlpfuse.orchestrator.cli import main

    assert main(["gc", "--cache", str(tmp_path), "--dry-run"]) == 0
    assert len(store.list()) == 7
    assert main(["gc", "--cache", str(tmp_path)]) == 0
    assert sorted(a.key for a in store.list()) == ["c_new", "e_new", "s1"]
    assert store.get("evaluate", "e_new") is not None
