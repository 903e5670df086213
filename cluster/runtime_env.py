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


def runtime_env(project_root: Path) -> dict[str, Any]:
    """``runtime_env`` for ``ray.init``/``JobSubmissionClient.submit_job``: ``project_root`` as the
    working directory (so jobs import this checkout's ``stages``/``orchestrator``/``cluster``),
    without the paths in :data:`WORKING_DIR_EXCLUDES`, with :data:`JOB_ENV_VARS`."""
    root = Path(project_root).expanduser().resolve()
    if not (root / "pyproject.toml").is_file():
        raise InputError(f"{root} is not the mlpfuse project root (no pyproject.toml there)")
    return {
        "working_dir": str(root),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": dict(JOB_ENV_VARS),
    }
