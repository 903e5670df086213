"""Submit a pipeline to a Ray cluster through Ray Jobs: the spec's directory (or the current one,
when the spec lies under it) as the working directory, and this installed mlpfuse as the job's code."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mlpfuse.core.errors import InputError


def submit(spec: Path, address: str, *, wait: bool = False) -> str:
    """Submit ``mlpfuse run SPEC --address auto`` as a Ray job; returns the job id. With ``wait``,
    the job's logs are streamed as they come and a failed job raises (:class:`InputError`, exit 2,
    when the run itself exited 2 on bad input)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from mlpfuse.cluster.runtime_env import package_dir, runtime_env
    from mlpfuse.orchestrator.spec import load_spec

    spec = Path(spec).resolve()
    load_spec(spec)  # bad specs fail here, not on the cluster
    cwd = Path.cwd().resolve()
    work = cwd if spec.is_relative_to(cwd) else spec.parent
    rel = spec.relative_to(work)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection errors come in many types
        raise InputError(f"cannot reach the Ray dashboard at {address}: {e}") from e
    with tempfile.TemporaryDirectory(prefix="mlpfuse-submit-") as tmp:
        job_id = client.submit_job(
            entrypoint=f"python -m mlpfuse.orchestrator.cli run {rel.as_posix()} --address auto",
            runtime_env=runtime_env(work, package_dir(Path(tmp))),
        )
    print(f"submitted job {job_id} to {address}", flush=True)
    if wait:
        _follow(client, job_id)
        info = client.get_job_info(job_id)
        if info.status != JobStatus.SUCCEEDED:
            if info.driver_exit_code == 2:  # the run refused its input: the same exit code here
                raise InputError(f"job {job_id} ended {info.status}: the run refused its input "
                                 "(the job's log above says why)")
            raise RuntimeError(f"job {job_id} ended {info.status} (driver exit code {info.driver_exit_code})")
    return job_id


def _follow(client: object, job_id: str) -> None:
    """Print the job's logs as they are written, until the job ends."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception:  # the log stream can drop (dashboard restart): fall back to polling the end
        from ray.job_submission import JobStatus

        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        while client.get_job_status(job_id) not in terminal:  # type: ignore[attr-defined]
            time.sleep(2)
        print(client.get_job_logs(job_id))  # type: ignore[attr-defined]
