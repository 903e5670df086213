"""A hub checkpoint's cache key comes without downloading its weights (``mlpfuse plan`` never
downloads), and it is the key the run computes once the snapshot is on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlpfuse.core.errors import CheckpointError
from mlpfuse.stages.model import checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(tmp_path: Path, ckpt: Path) -> Path:
    """A Hugging Face hub cache holding ``acme/tiny`` at commit SHA (the layout the hub client writes)."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return tmp_path / "hub"


def _run(code: str, hub: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_cached_hub_snapshot_keys_as_the_run_does(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    hub = _hub_cache(tmp_path, tiny_checkpoints["llama"])
    out = _run("from mlpfuse.stages.model.checkpoint import model_key, resolve_source, source_key\n"
               "src = resolve_source('acme/tiny')\n"
               "print(model_key('acme/tiny'), source_key(src), src.commit)", hub)
    assert out.returncode == 0, out.stderr
    planned, run, commit = out.stdout.split()
    sizes = [(f.name, f.stat().st_size) for f in tiny_checkpoints["llama"].glob("*.safetensors")]
    assert planned == run == checkpoint._hub_key("acme/tiny", SHA, sizes) and commit == SHA
    # Not in the cache and no network: a clear error naming the model, nothing downloaded.
    missing = _run("from mlpfuse.stages.model.checkpoint import model_key; model_key('acme/absent')", hub)
    assert missing.returncode != 0 and "could not read 'acme/absent'" in missing.stderr
    assert not (hub / "models--acme--absent" / "snapshots").exists()


def test_the_hubs_file_list_gives_the_snapshots_key(tiny_checkpoints: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any download, the key is read from the hub's metadata: the same names, sizes and
    commit give the same key the downloaded snapshot gives."""
    import huggingface_hub

    files = sorted(tiny_checkpoints["llama"].iterdir())
    siblings = [SimpleNamespace(rfilename=f.name, size=f.stat().st_size) for f in files]
    siblings.append(SimpleNamespace(rfilename="sub/other.safetensors", size=1))  # not at the top: not fetched
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("not cached")))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo, files_metadata=False: SimpleNamespace(sha=SHA, siblings=siblings))
    sizes = [(f.name, f.stat().st_size) for f in files if f.suffix == ".safetensors"]
    assert checkpoint.model_key("acme/tiny") == checkpoint._hub_key("acme/tiny", SHA, sizes)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo, files_metadata=False: SimpleNamespace(sha=SHA, siblings=[]))
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        checkpoint.model_key("acme/tiny")
