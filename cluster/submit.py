"""Submit a pipeline to a Ray cluster through Ray Jobs, with this project as the working dir."""

from __future__ import annotations

import time
from pathlib import Path

from mlpfuse.core.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def submit(spec: Path, address: str, *, wait: bool = False) -> str:
    """Submit ``mlpfuse run SPEC --address auto`` as a Ray job; returns the job id.

    The spec travels inside the working directory, so it must live under the project root.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    from mlpfuse.cluster.runtime_env import runtime_env
    from mlpfuse.orchestrator.spec import load_spec

    spec = spec.resolve()
    load_spec(spec)  # bad specs fail here, not on the cluster
    try:
        rel = spec.relative_to(PROJECT_ROOT)
    except ValueError:
        raise InputError(f"spec {spec} must be inside the project directory {PROJECT_ROOT} to be shipped") from None
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection errors come in many types
        raise InputError(f"cannot reach the Ray dashboard at {address}: {e}") from e
    job_id = client.submit_job(
        entrypoint=f"python -m mlpfuse.orchestrator.cli run {rel.as_posix()} --address auto",
        runtime_env=runtime_env(PROJECT_ROOT),
    )
    if wait:
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while client.get_job_status(job_id) not in terminal:
            time.sleep(2)
        print(client.get_job_logs(job_id))
        if client.get_job_status(job_id) != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended {client.get_job_status(job_id)}")
    return job_id
