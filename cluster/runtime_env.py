"""The Ray runtime environment that ships this project to a cluster's workers (Ray Jobs, Train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlpfuse.core.errors import InputError

# Not shipped: virtualenvs, VCS data, caches and local outputs (gitignore-style patterns). Ray
# refuses working directories over its upload limit, and none of these are needed to run.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    ".git/",
    "**/__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "build/",
    "runs/",
    ".ci/",
)

# Environment of every stage task's process (read before torch loads). GNU OpenMP's pool threads
# spin while they wait for work, taking the cores from the threads a stage runs beside torch's
# pool (collect's Parquet writer): on 2 cores collect took 60.9 s with passive waiting against
# 74.9 s spinning, while the streamed evaluation stayed within noise (33.0 vs 32.1 s, 2 runs each;
# benchmarks/bench_collect.py, bench_backbone.py --child-env).
TASK_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

# Environment of every job process.
JOB_ENV_VARS: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Logs reach the driver (and `mlpfuse submit --wait`) as they are written.
    "PYTHONUNBUFFERED": "1",
    **TASK_ENV,
}


# The checkout's code folders: the code travels as the assembled package (``py_modules``), and a
# folder named mlpfuse/ in the working directory would shadow it on the workers' sys.path.
CODE_EXCLUDES: tuple[str, ...] = ("/mlpfuse/", "/stages/", "/orchestrator/", "/cluster/")
# The package's files that travel (sources, shipped configs and specs).
_PACKAGE_FILES = ("*.py", "*.yaml", "*.json", "py.typed")


def package_dir(dest: Path) -> Path:
    """The installed ``mlpfuse`` package assembled under ``dest/mlpfuse`` (a checkout's editable
    install maps its top-level folders into it; a wheel already holds it in one place), for
    ``py_modules``: the workers import the same code as this driver, installed or not."""
    import importlib

    root = Path(dest) / "mlpfuse"
    for name in ("mlpfuse", "mlpfuse.orchestrator", "mlpfuse.stages", "mlpfuse.cluster", "mlpfuse.examples"):
        src = Path(list(importlib.import_module(name).__path__)[0])
        out = root.joinpath(*name.split(".")[1:])
        for pattern in _PACKAGE_FILES:
            for f in src.rglob(pattern):
                rel = f.relative_to(src)
                if "__pycache__" in rel.parts or (name == "mlpfuse" and rel.parts[0] in ("orchestrator", "stages", "cluster", "examples")):
                    continue
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(f.read_bytes())
    return root


def runtime_env(working_dir: Path, package: Path | None = None) -> dict[str, Any]:
    """``runtime_env`` for ``JobSubmissionClient.submit_job``: ``working_dir`` (the specs and data
    a job reads by relative path) without the paths in :data:`WORKING_DIR_EXCLUDES` and the code
    folders, ``package`` (from :func:`package_dir`) as ``py_modules``, and :data:`JOB_ENV_VARS`."""
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"working directory {root} does not exist")
    env: dict[str, Any] = {
        "working_dir": str(root),
        "excludes": [*WORKING_DIR_EXCLUDES, *CODE_EXCLUDES],
        "env_vars": dict(JOB_ENV_VARS),
    }
    if package is not None:
        env["py_modules"] = [str(package)]
    return env
