"""Hostile inputs beyond the spec (tests/test_spec_fuzz.py): a config that declares absurd sizes,
links planted in the cache."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest

from mlpfuse.core.errors import CheckpointError
from mlpfuse.orchestrator.store import ArtifactStore
from mlpfuse.stages import shard
from tests.conftest import make_tiny


def test_absurd_sizes_in_a_config_are_refused_before_any_allocation(tmp_path: Path) -> None:
    ckpt = make_tiny("llama", tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg |= {"intermediate_size": 10**10, "vocab_size": 10**9}  # ~3e12 parameters declared
    (ckpt / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="declares 2,944,000,009,440 parameters but the weight files hold"):
        shard.run(shard.ShardConfig(model=str(ckpt)), {}, tmp_path / "out")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # < 200 MB more
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["file", "artifact"])
def test_links_in_the_cache_pointing_out_of_it_are_refused(what: str, tmp_path: Path) -> None:
    """A file (or a whole artifact) of the cache replaced by a link to elsewhere, with the very
    bytes its manifest lists: never handed out; quarantined as a link out of the store."""
    store = ArtifactStore(tmp_path / "cache")
    staging = store.staging_dir("s", "k")
    staging.mkdir(parents=True)
    (staging / "w.bin").write_bytes(b"weights" * 100)
    art = store.commit("s", "k", staging, {"result": {}})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if what == "file":
        (outside / "w.bin").write_bytes((art.path / "w.bin").read_bytes())
        (art.path / "w.bin").unlink()
        os.symlink(outside / "w.bin", art.path / "w.bin")
    else:
        for f in art.path.iterdir():
            (outside / f.name).write_bytes(f.read_bytes())
        real = art.path
        for f in real.iterdir():
            f.unlink()
        real.rmdir()
        os.symlink(outside, real)
    assert store.get("s", "k") is None
    (record,) = list((store.local / "quarantine").glob("*/QUARANTINED"))
    assert "link out of the store" in record.read_text()
    assert (outside / "w.bin").exists()  # the link's target is left alone
