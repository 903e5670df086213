"""A two-node Ray cluster on loopback: a head and a second node (separate processes, separate temp
dirs, one machine), a pipeline submitted with ``mlpfuse submit --wait``, and evidence from Ray's
state API that stage tasks ran on both nodes. Opt-in (``-m cluster``); about a minute per cluster.

The nodes are started with ``ray start --block`` so every Ray process is a descendant of a process
this test started; they are stopped by killing those process trees (never ``ray stop``, which ends
every Ray on the machine), plus any straggler whose command line names this test's temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import tiny_llama_with_tokenizer, write_corpus

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --address=...` (a second node) refuses to run under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# the setting that keeps every Ray listener on 127.0.0.1; with =1 it would turn 127.0.0.1 into the
# host's routable address (and bind every interface), and so could not reach the loopback-only head.
# So the second node runs Ray's own `ray start` command with only that check lifted: its processes
# still inherit =0 and bind 127.0.0.1.
RAY_START_NODE = (
    "import sys\n"
    "import ray._private.ray_constants as rc, ray._private.services as services\n"
    "rc.ENABLE_RAY_CLUSTER = True  # lifts `ray start`'s multi-node check in this process only\n"
    "services.resolve_ip_for_localhost = lambda host: host  # ...and keeps 127.0.0.1 as given\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "main()\n"
)


def _listeners(procs: list[psutil.Process]) -> dict[str, str]:
    """{"ip:port": process name} of the listening TCP and bound UDP sockets of ``procs``."""
    out = {}
    for p in procs:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                out[f"{c.laddr.ip}:{c.laddr.port}"] = name
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Ray Jobs run the entrypoint's `python` from PATH: this venv's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env


def _kill(procs: list[psutil.Process]) -> int:
    """Freeze, then SIGKILL ``procs`` (frozen first so none can start another)."""
    alive = []
    for p in procs:
        try:
            p.suspend()
            alive.append(p)
        except psutil.NoSuchProcess:
            pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)
    return len(alive)


class RayNode:
    """One ``ray start --block`` process (head or worker node) and everything it starts."""

    def __init__(self, args: list[str], temp_dir: Path, log: Path, *, env: dict[str, str] | None = None,
                 private: Path | None = None):
        """``private``: a directory this node does not share with the machine: the node runs in its
        own mount namespace with an empty tmpfs over it (as a node of a cluster sees only its own
        disk there)."""
        self.temp_dir = temp_dir
        self.log = log
        self._log = open(log, "w")
        ray = [RAY] if "--head" in args else [sys.executable, "-c", RAY_START_NODE]
        # unshare execs sh, which mounts and execs Ray: the pid is still the `ray start` process.
        wrap = ([] if private is None else
                ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                 str(private)])
        self.proc = subprocess.Popen(
            [*wrap, *ray, "start", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
             f"--dashboard-agent-listen-port={_free_port()}", *args],
            env={**_env(), **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_started(self, timeout: float = 90) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray start failed ({self.proc.poll()}):\n{self.log.read_text()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """The ``ray start`` process, its descendants, and any process naming this node's temp dir."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                found.setdefault(p.pid, p)
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> int:
        n = 0
        for _ in range(3):  # stragglers (a worker being started) are caught on the next pass
            procs = self.processes()
            if not procs:
                break
            n += _kill(procs)
        self.proc.wait(timeout=15)
        self._log.close()
        return n


@pytest.fixture(scope="module")
def cluster_assets(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cluster")
    ckpt = tiny_llama_with_tokenizer(root / "ckpt", smollm2_tokenizer, layers=6)
    return {"root": root, "ckpt": ckpt, "corpus": write_corpus(root / "corpus")}


@pytest.fixture()
def spec_dir() -> Iterator[Path]:
    """A directory inside the project (specs travel in the job's working dir), removed afterwards."""
    d = ROOT / ".pytest-cluster-spec" / uuid.uuid4().hex[:12]
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        try:
            d.parent.rmdir()
        except OSError:
            pass  # another run's spec is still there


def _start_cluster(cpus: int, tmp: Path, *, env: dict[str, str] | None = None,
                   private: Path | None = None) -> tuple[list[RayNode], str, Path]:
    """A head (resource "head") and a second node (resource "node2"; ``private``: see RayNode)."""
    temp_root = Path(tempfile.mkdtemp(prefix="mfc-", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dash = _free_port(), _free_port()
    head = RayNode(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--ray-client-server-port={_free_port()}", f"--num-cpus={cpus}", '--resources={"head": 1}'],
                   temp_root / "head", tmp / "head.log", env=env)
    nodes = [head]
    try:
        head.wait_started()
        node2 = RayNode([f"--address=127.0.0.1:{port}", f"--num-cpus={cpus}", '--resources={"node2": 1}'],
                        temp_root / "node2", tmp / "node2.log", env=env, private=private)
        nodes.append(node2)
        node2.wait_started()
        url = f"http://127.0.0.1:{dash}"
        end = time.time() + 60
        while True:  # the dashboard answers, and sees both nodes alive
            from ray.util.state import list_nodes

            try:
                if len(list_nodes(address=url, filters=[("state", "=", "ALIVE")])) == 2:
                    break
            except Exception:  # the dashboard is still starting
                pass
            if time.time() > end:
                raise RuntimeError("the dashboard never showed two alive nodes")
            time.sleep(0.5)
    except BaseException:
        for n in nodes:
            n.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return nodes, url, temp_root


def _stop_cluster(nodes: list[RayNode], temp_root: Path) -> int:
    n = sum(node.stop() for node in reversed(nodes))
    shutil.rmtree(temp_root, ignore_errors=True)
    left = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_root) in a for a in (p.info["cmdline"] or []))]
    assert left == [], f"Ray processes of this test survive: {[p.pid for p in left]}"
    return n


def _write_spec(spec_dir: Path, assets: dict[str, Path], tmp: Path) -> Path:
    spec = {
        "name": "cluster", "model": str(assets["ckpt"]), "cache": str(tmp / "shared-cache"),
        "output": str(tmp / "out"),
        "data": {"corpus": str(assets["corpus"]), "block_size": 32, "calib_tokens": 512, "eval_tokens": 128},
        "collect": {"num_workers": 2},
        "evaluate": {"window": 32, "stride": 16},
    }
    path = spec_dir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _task_nodes(url: str) -> dict[str, set[str]]:
    """{"head"|"node2": names of the stage tasks that ran there} from Ray's state API."""
    from ray.util.state import list_nodes, list_tasks

    names = {}
    for n in list_nodes(address=url, detail=True):
        res = n.resources_total or {}
        names[n.node_id] = "head" if "head" in res else "node2" if "node2" in res else n.node_id
    out: dict[str, set[str]] = {}
    for t in list_tasks(address=url, filters=[("func_or_class_name", "=", "execute_node")], detail=True,
                        limit=1000, raise_on_missing_output=False):
        if t.state == "FINISHED" and t.node_id:
            out.setdefault(names.get(t.node_id, t.node_id), set()).add(t.task_id)
    return out


def _stuck(url: str) -> list[dict]:
    """Stage tasks waiting for a node while no stage task runs: nothing will ever run them."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=url, filters=[("func_or_class_name", "=", "execute_node")], detail=True,
                       limit=1000, raise_on_missing_output=False)
    if any(t.state == "RUNNING" for t in tasks):
        return []
    return [{"task": t.task_id, "needs": t.required_resources} for t in tasks if t.state == "PENDING_NODE_ASSIGNMENT"]


def _submit(spec: Path, url: str, timeout: float) -> tuple[int | None, str]:
    """``mlpfuse submit SPEC --wait``; gives up after ``timeout`` s, or after 30 s of stage tasks
    that no node can take."""
    import io
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlpfuse.orchestrator.cli", "submit", str(spec), "--address", url, "--wait"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    buf = io.StringIO()
    reader = threading.Thread(target=lambda: buf.write(proc.stdout.read()), daemon=True)
    reader.start()
    end, stuck_since, why = time.time() + timeout, None, ""
    while proc.poll() is None and time.time() < end:
        time.sleep(2)
        try:
            stuck = _stuck(url)
        except Exception:  # the state API is best effort while the job starts
            stuck = []
        stuck_since = (stuck_since or time.time()) if stuck else None
        if stuck_since and time.time() - stuck_since > 30:
            why = f"\n[test] gave up: stage tasks no node can run: {stuck}"
            break
    if proc.poll() is None:
        try:
            root = psutil.Process(proc.pid)
            _kill([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
        proc.wait()
        reader.join(5)
        return None, buf.getvalue() + (why or f"\n[test] gave up after {timeout} s")
    reader.join(5)
    return proc.returncode, buf.getvalue()


def _stop_jobs(url: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    for job in client.list_jobs():
        if job.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            client.stop_job(job.submission_id)


def _run_on_cluster(cpus: int, tmp: Path, assets: dict[str, Path], spec_dir: Path, job_timeout: float) -> dict:
    t0 = time.time()
    nodes, url, temp_root = _start_cluster(cpus, tmp)
    t_up = time.time() - t0
    try:
        spec = _write_spec(spec_dir, assets, tmp)
        t1 = time.time()
        rc, out = _submit(spec, url, job_timeout)
        t_job = time.time() - t1
        placed = _task_nodes(url) if rc == 0 else {}
        if rc != 0:
            _stop_jobs(url)
        listeners = _listeners([p for n in nodes for p in n.processes()])
    finally:
        t2 = time.time()
        killed = _stop_cluster(nodes, temp_root)
        t_down = time.time() - t2
    timing = f"cluster up {t_up:.1f}s, submit --wait {t_job:.1f}s, down {t_down:.1f}s ({killed} processes)"
    print(f"\n[cluster] {cpus} CPU(s) per node: rc={rc}; {timing}; tasks per node: "
          f"{ {k: len(v) for k, v in placed.items()} }")
    exposed = {a: n for a, n in listeners.items() if not a.startswith(("127.", "::1:", "::ffff:127."))}
    print(f"[cluster] {len(listeners)} listeners, beyond loopback: {exposed}")
    return {"rc": rc, "out": out, "placed": placed, "timing": timing, "tmp": tmp, "exposed": exposed,
            "listeners": listeners}


def _check_run(r: dict) -> None:
    assert len(r["listeners"]) >= 6 and r["exposed"] == {}, r["exposed"]  # two nodes, loopback only
    assert r["rc"] == 0, r["out"][-4000:]
    assert re.search(r"submitted job \S+", r["out"])
    report = json.loads((r["tmp"] / "out" / "report.json").read_text())
    assert {s["status"] for s in report["stages"].values()} == {"run"}
    assert report["base"]["perplexity"] > 1
    # Every stage's artifact is in the shared cache, verified.
    from mlpfuse.orchestrator.store import ArtifactStore

    store = ArtifactStore(r["tmp"] / "shared-cache")
    for s in report["stages"].values():
        assert store.get(s["stage"], s["cache_key"]) is not None
    assert set(r["placed"]) == {"head", "node2"}, f"stage tasks ran only on {set(r['placed'])}"


def test_pipeline_on_two_nodes(tmp_path: Path, cluster_assets: dict[str, Path], spec_dir: Path) -> None:
    """Two 2-CPU nodes: the three 2-CPU tasks ready after `data` (evaluate, collect.part0/1) cannot
    share a node, so both nodes run stage tasks."""
    _check_run(_run_on_cluster(2, tmp_path, cluster_assets, spec_dir, job_timeout=240))


def test_pipeline_on_two_one_cpu_nodes(tmp_path: Path, cluster_assets: dict[str, Path], spec_dir: Path) -> None:
    _check_run(_run_on_cluster(1, tmp_path, cluster_assets, spec_dir, job_timeout=120))
