"""The artifact store on a remote URI (fsspec's in-process ``memory://`` stands in for s3/gs/hdfs):
upload with the manifest last, a read-through local mirror, checksums verified on download."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import fsspec
import pytest

from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.pipeline import InputMissing, execute_node, make_node
from mlpfuse.orchestrator.store import MIRROR_ENV, ArtifactStore
from mlpfuse.stages.shard import ShardConfig
from tests.conftest import make_tiny, tiny_llama_with_tokenizer, write_corpus

MEM = fsspec.filesystem("memory")
MP = pytest.MonkeyPatch
FILES = {"a.bin": bytes(range(256)) * 40, "sub/b.txt": b"hello\n"}


@pytest.fixture
def uri() -> Iterator[str]:
    name = f"mlpfuse-test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    if MEM.exists(f"/{name}"):
        MEM.rm(f"/{name}", recursive=True)


def _node(tmp: Path, monkeypatch: MP, uri: str, node: str) -> ArtifactStore:
    """A store as seen from one machine: its own empty local mirror."""
    monkeypatch.setenv(MIRROR_ENV, str(tmp / node))
    return ArtifactStore(uri)


def _commit(store: ArtifactStore, key: str) -> None:
    staging = store.staging_dir("s", key)
    for rel, data in FILES.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    (staging / ".parts").mkdir()
    (staging / ".parts" / "a.bin.json").write_text("{}")  # a part marker: never uploaded
    store.commit("s", key, staging, {"config": {}, "result": {"x": 1}})


def _remote(uri: str, rel: str) -> str:
    return f"/{uri.removeprefix('memory://')}/{rel}"


def test_commit_then_get_round_trips(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    store = _node(tmp_path, monkeypatch, uri, "n1")
    assert store.root == uri and ArtifactStore(str(store.root) + "/").root == uri  # round-trips
    assert store.get("s", "k1") is None
    _commit(store, "k1")
    assert not store.staging_dir("s", "k1").exists()
    assert sorted(MEM.find(_remote(uri, "artifacts/s/k1"))) == sorted(
        _remote(uri, f"artifacts/s/k1/{rel}") for rel in [*FILES, "manifest.json"])
    art = store.get("s", "k1")
    assert art is not None and art.path.is_relative_to(tmp_path / "n1")
    assert {rel: (art.path / rel).read_bytes() for rel in FILES} == FILES
    assert art.manifest["result"] == {"x": 1}
    assert art.manifest["files"]["a.bin"]["size"] == len(FILES["a.bin"])


def test_other_node_downloads(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    _commit(_node(tmp_path, monkeypatch, uri, "n1"), "k1")
    other = _node(tmp_path, monkeypatch, uri, "n2")
    assert not other.artifact_dir("s", "k1").exists()
    assert other.get("s", "k1", verify=False) is not None  # manifest only: nothing downloaded
    assert not (other.artifact_dir("s", "k1") / "a.bin").exists()
    art = other.get("s", "k1")
    assert art is not None and art.path.is_relative_to(tmp_path / "n2")
    assert {rel: (art.path / rel).read_bytes() for rel in FILES} == FILES
    (art.path / "a.bin").write_bytes(b"damaged locally")  # a bad mirror copy is fetched again
    art = other.get("s", "k1")
    assert art is not None and (art.path / "a.bin").read_bytes() == FILES["a.bin"]


def test_files_without_manifest_are_no_artifact(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    store = _node(tmp_path, monkeypatch, uri, "n1")
    MEM.pipe_file(_remote(uri, "artifacts/s/k1/a.bin"), b"half an upload")  # a crash mid-commit
    assert store.get("s", "k1") is None and store.list() == []
    _commit(store, "k1")  # the next commit overwrites it
    art = _node(tmp_path, monkeypatch, uri, "n2").get("s", "k1")
    assert art is not None and (art.path / "a.bin").read_bytes() == FILES["a.bin"]


@pytest.mark.parametrize("damage", ["bitflip", "missing", "manifest"])
def test_corrupt_remote_is_never_returned(tmp_path: Path, monkeypatch: MP, uri: str,
                                          damage: str) -> None:
    _commit(_node(tmp_path, monkeypatch, uri, "n1"), "k1")
    name = "manifest.json" if damage == "manifest" else "a.bin"
    target = _remote(uri, f"artifacts/s/k1/{name}")
    if damage == "missing":
        MEM.rm_file(target)
    elif damage == "manifest":
        MEM.pipe_file(target, MEM.cat_file(target)[:-5])
    else:
        data = bytearray(MEM.cat_file(target))
        data[10] ^= 0x01
        MEM.pipe_file(target, bytes(data))
    other = _node(tmp_path, monkeypatch, uri, "n2")
    assert other.get("s", "k1") is None
    assert not (other.artifact_dir("s", "k1") / "a.bin").exists()
    assert not MEM.exists(_remote(uri, "artifacts/s/k1/manifest.json"))  # gone for every node
    (record,) = MEM.ls(_remote(uri, "quarantine"), detail=False)
    assert MEM.cat_file(f"{record}/QUARANTINED").strip()
    _commit(other, "k1")  # recomputed
    assert other.get("s", "k1") is not None


def test_list_and_remove(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    store = _node(tmp_path, monkeypatch, uri, "n1")
    _commit(store, "k1")
    _commit(store, "k2")
    assert [(a.stage, a.key) for a in store.list()] == [("s", "k1"), ("s", "k2")]
    store.remove("s", "k1")
    assert store.get("s", "k1") is None and not store.artifact_dir("s", "k1").exists()
    assert not MEM.exists(_remote(uri, "artifacts/s/k1"))
    assert [a.key for a in _node(tmp_path, monkeypatch, uri, "n2").list()] == ["k2"]
    store.remove("s", "nothing")  # no error


def test_execute_node_on_remote_store(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    """One stage through the pipeline's own task body (in-process: memory:// is per process)."""
    from mlpfuse.stages import shard

    ckpt = make_tiny("llama", tmp_path / "ckpt")
    node = asdict(make_node({}, "shard", "shard", shard.ShardConfig(model=str(ckpt))))
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n1"))
    first = execute_node(uri, node)
    assert first["status"] == "run"
    assert MEM.exists(_remote(uri, f"artifacts/shard/{node['key']}/manifest.json"))
    assert execute_node(uri, node)["status"] == "hit"
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n2"))  # another node: a hit, by download
    second = execute_node(uri, node)
    assert second["status"] == "hit" and second["result"] == first["result"]
    n2 = ArtifactStore(uri).artifact_dir("shard", node["key"])  # this node's mirror
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n1"))
    n1 = ArtifactStore(uri).artifact_dir("shard", node["key"])
    manifest = json.loads((n2 / "manifest.json").read_text())
    assert n1 != n2 and all((n2 / rel).read_bytes() == (n1 / rel).read_bytes() for rel in manifest["files"])


def test_a_stage_reads_its_inputs_by_key_on_its_own_node(tmp_path: Path, monkeypatch: MP, uri: str,
                                                         smollm2_tokenizer: Path) -> None:
    """shard computed on one node, data on another with an empty mirror: data's input arrives by
    download (verified), never through the path on the node that produced it."""
    from mlpfuse.stages import data

    ckpt = tiny_llama_with_tokenizer(tmp_path / "ckpt", smollm2_tokenizer, layers=2)
    corpus = write_corpus(tmp_path / "corpus")
    known: dict[str, str] = {}
    sh = make_node(known, "shard", "shard", ShardConfig(model=str(ckpt)))
    known["shard"] = sh.key
    dt = make_node(known, "data", "data", data.TokenizeConfig(corpus=str(corpus), corpus_key="c", block_size=16,
                                                              calib_tokens=64, eval_tokens=32), {"shard": "shard"})
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n1"))
    up = execute_node(uri, asdict(sh))
    assert "path" not in up  # nothing node-local travels between tasks
    n1_shard = ArtifactStore(uri).artifact_dir("shard", sh.key)
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n2"))
    assert execute_node(uri, asdict(dt), up)["status"] == "run"
    n2_shard = ArtifactStore(uri).artifact_dir("shard", sh.key)
    assert n2_shard != n1_shard and (n2_shard / "shard.json").read_bytes() == (n1_shard / "shard.json").read_bytes()
    MEM.rm(_remote(uri, f"artifacts/shard/{sh.key}/manifest.json"))  # the input is gone from the store
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "n3"))
    # InputMissing, not an InputError: the session recomputes the input and runs the task again.
    with pytest.raises(InputMissing, match=f"its input shard \\(shard {sh.key}\\) is not in the cache {uri}/artifacts"):
        execute_node(uri, asdict(make_node(known, "data2", "data", data.TokenizeConfig(
            corpus=str(corpus), corpus_key="c2", block_size=16, calib_tokens=64, eval_tokens=32), {"shard": "shard"})), up)


def test_a_node_that_sees_another_local_cache_writes_nothing(tmp_path: Path) -> None:
    """A local cache is checked by its identity: a node that sees no store, or another store, at
    the driver's path gets an exit-2 error naming the path, and nothing is created there."""
    from mlpfuse.orchestrator.pipeline import CacheNotShared, check_shared, open_store

    driver = ArtifactStore(tmp_path / "cache")
    assert driver.identity and check_shared(str(driver.root), driver.identity) is None
    assert ArtifactStore(tmp_path / "cache").identity == driver.identity  # reopening keeps it
    blind = tmp_path / "elsewhere"
    assert check_shared(str(blind), driver.identity) is not None
    with pytest.raises(CacheNotShared, match=f"the cache {blind} is not shared: node .* does not see"):
        open_store(str(blind), driver.identity)
    assert not blind.exists()
    other = ArtifactStore(blind)  # another store at the same path on that node
    with pytest.raises(CacheNotShared):
        open_store(str(other.root), driver.identity)
    assert isinstance(CacheNotShared("x"), InputError)


def test_a_running_stage_state_is_kept_remote_and_restored_verified(tmp_path: Path, monkeypatch: MP, uri: str) -> None:
    """A running stage's state (checkpoints) saved at the URI: a newer state replaces the older
    (whose files go once the new state.json is written), another node restores it verified in its
    order, a corrupted file makes the restore refuse (nothing written), and the commit removes it."""
    n1 = _node(tmp_path, monkeypatch, uri, "n1")
    src = tmp_path / "src"
    (src / "step1").mkdir(parents=True)
    (src / "step1" / "w.bin").write_bytes(b"a" * 1000)
    (src / "progress.json").write_text('{"tag": "step1"}')
    n1.save_state("s", "k", src, ["step1/w.bin", "progress.json"])
    (src / "step2").mkdir()
    (src / "step2" / "w.bin").write_bytes(b"b" * 1000)
    (src / "progress.json").write_text('{"tag": "step2"}')
    n1.save_state("s", "k", src, ["step2/w.bin", "progress.json"])
    assert not MEM.exists(_remote(uri, "staging/s-k/step1/w.bin"))
    state = json.loads(MEM.cat(_remote(uri, "staging/s-k/state.json")))
    assert list(state["files"]) == ["step2/w.bin", "progress.json"]

    n2 = _node(tmp_path, monkeypatch, uri, "n2")
    dest = tmp_path / "n2-ckpt"
    assert n2.restore_state("s", "k", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == ["progress.json", "step2/w.bin"]
    assert (dest / "step2" / "w.bin").read_bytes() == b"b" * 1000 and json.loads((dest / "progress.json").read_text())["tag"] == "step2"
    assert not list(tmp_path.glob(".n2-ckpt.restore-*"))

    MEM.pipe(_remote(uri, "staging/s-k/step2/w.bin"), b"c" * 1000)  # same size, other bytes
    assert not n2.restore_state("s", "k", tmp_path / "n3-ckpt") and not (tmp_path / "n3-ckpt").exists()
    assert not n2.restore_state("s", "other", tmp_path / "n4-ckpt")  # nothing saved for that key

    _commit(n1, "k")
    assert not MEM.exists(_remote(uri, "staging/s-k")) and n1.get("s", "k") is not None
    assert ArtifactStore(tmp_path / "local").state_sync("s", "k") is None  # staging on its own disk
