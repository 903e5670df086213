"""The wheel built from this checkout is the whole product under one name: every module of the
top-level folders as ``mlpfuse.*``, the shipped specs, lm-eval task and ZeRO configs as package
data, the ``mlpfuse`` command, and no top-level ``stages``/``orchestrator``/``cluster``. Unpacked
outside the checkout, it imports and finds its demo spec; the bare names do not import.
(``scripts/check_wheel.sh`` installs it into a fresh venv and runs the demo from there.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mlpfuse": "mlpfuse", "orchestrator": "mlpfuse/orchestrator", "stages": "mlpfuse/stages",
           "cluster": "mlpfuse/cluster", "examples": "mlpfuse/examples"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Built from a copy of the files git would commit: a build/ folder left in the checkout by an
    # earlier build must not leak stale modules into the wheel.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (whl,) = out.glob("mlpfuse-*.whl")
    return whl


def test_the_wheel_holds_every_module_under_mlpfuse(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mlpfuse"}, tops
    for folder, installed in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).as_posix()
            if folder == "mlpfuse" and rel.split("/")[0] in FOLDERS:
                continue
            assert f"{installed}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    for data in ("mlpfuse/examples/smollm2-demo.yaml", "mlpfuse/lm_eval_tasks/mlpfuse_heldout.yaml",
                 "mlpfuse/stages/model/zero3.json", "mlpfuse/cluster/kuberay-rayjob.yaml", "mlpfuse/py.typed"):
        assert data in names, data
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mlpfuse = mlpfuse.orchestrator.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_unpacked_wheel_imports_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import mlpfuse, mlpfuse.stages.registry, mlpfuse.orchestrator.job, mlpfuse.cluster.submit\n"
            "from mlpfuse.orchestrator.cli import demo_spec\n"
            "from mlpfuse.orchestrator.spec import load_spec\n"
            "print(mlpfuse.__file__); print(load_spec(demo_spec()).name)\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "mlpfuse" / "__init__.py"), "smollm2-demo"]
    for bare in ("stages", "orchestrator", "cluster"):
        r = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, env=env, capture_output=True)
        assert r.returncode != 0, f"'import {bare}' works from the installed wheel"
