"""Plan a spec into stage nodes with cache keys, and execute them as a Ray DAG.

Every key is known before anything runs (a key hashes the stage, its version, its config and its
inputs' keys; the checkpoint and corpus enter through fingerprints of their files), so
``mlpfuse plan`` tells what is cached without running. Execution wraps the plain stage functions
with ``ray.remote`` at this edge only: resources, retries of dead workers, and caching.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlpfuse.cluster.runtime_env import TASK_ENV
from mlpfuse.core.artifacts import use_state_sync
from mlpfuse.core.compute import Compute, resolve_device, use_compute
from mlpfuse.core.errors import InputError
from mlpfuse.core.heap import bound_malloc_cache
from mlpfuse.orchestrator.spec import GPU_STAGES, PipelineSpec
from mlpfuse.orchestrator.store import (
    IDENTITY,
    ArtifactStore,
    cache_key,
    client_env,
    store_identity,
)
from mlpfuse.stages.collect import CollectPartConfig
from mlpfuse.stages.model.checkpoint import model_key
from mlpfuse.stages.registry import STAGES

log = logging.getLogger("mlpfuse.pipeline")

# Ray listens on loopback only, reports no usage, and needs no auth token for local jobs. Ray reads
# these when it is imported, so they are set here, before anything in the process imports ray.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)


@dataclass(frozen=True)
class PlanNode:
    name: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]  # role -> upstream node name
    key: str
    input_keys: dict[str, str] = field(default_factory=dict)


def make_node(known: dict[str, str], name: str, stage: str, config: Any, inputs: dict[str, str] | None = None) -> PlanNode:
    """A node whose key follows from its stage, config and its inputs' keys (``known``: node
    name -> key, for nodes planned or executed earlier)."""
    inputs = inputs or {}
    sdef = STAGES[stage]
    cfg = config.model_dump(mode="json")
    input_keys = {role: known[n] for role, n in inputs.items()}
    return PlanNode(name, stage, cfg, inputs, cache_key(stage, sdef.version, cfg, input_keys), input_keys)


def build_plan(spec: PipelineSpec) -> list[PlanNode]:
    """The base stages of ``spec`` in dependency order, each with its cache key: shard, data,
    base evaluation, and collect (one node per data-parallel worker, then an exact merge)."""
    known: dict[str, str] = {}
    nodes: list[PlanNode] = []

    def add(name: str, stage: str, config: Any, inputs: dict[str, str] | None = None) -> None:
        node = make_node(known, name, stage, config, inputs)
        known[name] = node.key
        nodes.append(node)

    add("shard", "shard", spec.shard_config(model_key(spec.model)))
    add("data", "data", spec.data_config(), {"shard": "shard"})
    add("evaluate", "evaluate", spec.evaluate, {"shard": "shard", "data": "data"})
    workers = spec.collect.num_workers
    for w in range(workers):
        part = CollectPartConfig(**spec.collect.model_dump(), worker=w)
        add(f"collect.part{w}", "collect_part", part, {"shard": "shard", "data": "data"})
    add("collect", "collect", spec.collect, {"shard": "shard", **{f"part{w}": f"collect.part{w}" for w in range(workers)}})
    sim_inputs = {"shard": "shard", "collect": "collect", **({"data": "data"} if spec.similarity.skip_positions else {})}
    add("similarity", "similarity", spec.similarity, sim_inputs)
    return nodes


class CacheNotShared(InputError):
    """A node cannot see the run's local cache: the cache must be shared or remote."""


class InputMissing(Exception):
    """A task's input artifact is gone from the store, or failed verification there (and was
    quarantined): the session recomputes it and runs the task again."""

    def __init__(self, stage: str, key: str, why: str):
        super().__init__(stage, key, why)
        self.stage, self.key, self.why = stage, key, why

    def __str__(self) -> str:
        return self.why


def _node_name() -> str:
    """This process's node as Ray names it (address and id), or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return f"{ray.util.get_node_ip_address()} (node {ctx.get_node_id()[:12]})"
    except Exception:  # not inside a Ray worker
        pass
    return socket.gethostname()


def _not_shared(root: str, node: str) -> CacheNotShared:
    return CacheNotShared(
        f"the cache {root} is not shared: node {node} does not see the directory the driver wrote "
        f"(no {IDENTITY} there, or another store's). On a cluster the cache must be a directory every "
        "node mounts (NFS, a PVC) or an object store (cache: s3://bucket/prefix)")


def open_store(store_root: str, store_id: str | None) -> ArtifactStore:
    """The run's store as this node sees it. A local store must be the driver's (same identity):
    a node that sees another directory at that path (or none) gets :class:`CacheNotShared` before
    anything is written there."""
    if (blind := check_shared(store_root, store_id)) is not None:
        raise _not_shared(store_root, blind)
    return ArtifactStore(store_root)


def check_shared(store_root: str, store_id: str | None) -> str | None:
    """The node's name when it does not see the local store ``store_id`` at ``store_root``."""
    if store_id is not None and store_identity(Path(store_root)) != store_id:
        return _node_name()
    return None


def _launchers(stage: str, cfg: Any, compute: dict[str, Any]) -> dict[str, Any]:
    """What a stage needs from the cluster beyond its own process: distillation with several
    workers gets Ray Train's trainer (each worker with the stage's CPUs and GPUs)."""
    if stage == "distill" and cfg.workers > 1:
        from mlpfuse.cluster.ray_train import stage_trainer

        return {"train_fn": stage_trainer(cfg.workers, cpus_per_worker=compute.get("worker_cpus", 1),
                                          gpus_per_worker=float(compute.get("gpus", 0)),
                                          max_failures=int(compute.get("max_failures", 2)))}
    return {}


def execute_node(store_root: str, node: dict[str, Any], *upstream: dict[str, Any],
                 store_id: str | None = None, compute: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one node as a plain function: cache hit, or compute under the key's lock and commit.
    Inside a Ray task this is the whole task body. Inputs are resolved by key through the store on
    the node where it runs (a remote store downloads them into this node's mirror), never by the
    path on the node that produced them. ``compute``: the device and precision of the task."""
    bound_malloc_cache()
    store = open_store(store_root, store_id)
    stage, key = node["stage"], node["key"]
    inputs = {}
    for role, u in zip(node["inputs"], upstream, strict=True):
        found = store.get(u["stage"], u["key"], verify=store.remote is not None)
        if found is None:
            raise InputMissing(u["stage"], u["key"], (
                f"{node['name']}: its input {role} ({u['stage']} {u['key']}) is not in the cache "
                f"{store.location(u['stage'], u['key'])} as node {_node_name()} sees it (gone, or "
                "quarantined after failing verification)"))
        inputs[role] = found.path
    t0 = time.time()
    art = store.get(stage, key)
    if art is None:
        with store.lock(key):
            art = store.get(stage, key)  # a concurrent run may have finished it meanwhile
            if art is None:
                sdef = STAGES[stage]
                staging = store.staging_dir(stage, key)
                staging.mkdir(parents=True, exist_ok=True)
                cfg = sdef.config.model_validate(node["config"])
                c = compute or {}
                device = resolve_device(float(c.get("gpus", 0)))
                try:
                    with use_compute(Compute(device, c.get("precision", "auto"))), \
                            use_state_sync(store.state_sync(stage, key)):
                        result = sdef.run(cfg, inputs, staging, **_launchers(stage, cfg, c))
                except InputError:
                    shutil.rmtree(staging, ignore_errors=True)  # bad input: nothing worth resuming
                    raise
                manifest = {
                    "stage_version": sdef.version, "config": node["config"], "inputs": node["input_keys"],
                    "result": result, "seconds": round(time.time() - t0, 3), "node": _node_name(),
                    "device": device,
                }
                art = store.commit(stage, key, staging, manifest)
                return {"name": node["name"], "stage": stage, "key": key, "status": "run", "seconds": time.time() - t0, "result": result,
                        "node": manifest["node"], "device": device}
    return {"name": node["name"], "stage": stage, "key": key, "status": "hit", "seconds": time.time() - t0, "result": art.manifest.get("result", {})}


@contextmanager
def ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Join ``address``, or start an embedded Ray bound to 127.0.0.1 (stopped on exit)."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(  # address="local": never join a cluster found through RAY_ADDRESS or a stale file
            address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
            _node_ip_address="127.0.0.1", log_to_driver=True,
            runtime_env={"env_vars": {**RAY_ENV, **TASK_ENV}},  # every task process of the run
        )
    try:
        yield
    finally:
        ray.shutdown()


def _unwrap(e: BaseException) -> BaseException:
    """The stage's own exception inside Ray's wrapper (so bad input still exits with 2)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class Session:
    """One pipeline run: executes groups of nodes as Ray DAGs against one store, remembering every
    result, so later groups (candidates, halving rounds, export) can depend on earlier ones. Ray
    starts on the first group that has anything to compute, and stops at :meth:`close`."""

    def __init__(self, spec: PipelineSpec, store: ArtifactStore, force: set[str] | None = None):
        self.spec, self.store, self.force = spec, store, set(force or ())
        self.results: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, PlanNode] = {}  # every node run or hit, to recompute a lost one
        self._paths: dict[str, Path] = {}
        self._ray: Any = None
        self._gpus: float | None = None  # per GPU-stage task, once the cluster is known

    @property
    def keys(self) -> dict[str, str]:
        return {n: r["key"] for n, r in self.results.items()}

    def path(self, name: str) -> Path:
        """Node ``name``'s artifact on this machine (a remote store downloads it into the mirror)."""
        if name not in self._paths:
            r = self.results[name]
            art = self.store.get(r["stage"], r["key"])
            if art is None:
                raise InputError(f"{name}: artifact {self.store.location(r['stage'], r['key'])} is not in "
                                 "the cache as the driver sees it (computed on a node that does not share it?)")
            self._paths[name] = art.path
        return self._paths[name]

    def _hit(self, node: PlanNode) -> dict[str, Any] | None:
        # A remote artifact is verified where it is used (downloaded); a local one here.
        art = self.store.get(node.stage, node.key, verify=self.store.remote is None)
        if art is None:
            return None
        if self.store.remote is None:  # a remote one's files are downloaded when first read (path)
            self._paths[node.name] = art.path
        return {"name": node.name, "stage": node.stage, "key": node.key, "status": "hit", "seconds": 0.0, "result": art.manifest.get("result", {})}

    def run(self, nodes: list[PlanNode]) -> dict[str, dict[str, Any]]:
        """Execute ``nodes`` (cache hits are answered without Ray); returns their results."""
        for node in nodes:
            if node.stage in self.force or node.name in self.force:
                self.store.remove(node.stage, node.key)
        hits = {n.name: h for n in nodes if (h := self._hit(n)) is not None}
        for name in hits:
            log.info("%s: cached (%s)", name, hits[name]["key"])
        todo = [n for n in nodes if n.name not in hits]
        self.nodes.update({n.name: n for n in nodes})
        self.results.update(hits)
        lost: set[str] = set()
        while todo:
            try:
                self.results.update(self._execute(todo))
                break
            except InputMissing as e:  # an input vanished or was corrupt: recompute it, then retry
                gone = next((n for n, r in self.results.items() if r["key"] == e.key), None)
                if gone is None or gone in lost:
                    raise InputError(str(e)) from None
                lost.add(gone)
                log.warning("%s: its artifact is gone from the store or failed verification; recomputing it", gone)
                del self.results[gone]
                self._paths.pop(gone, None)
                self.run([self.nodes[gone]])
        return {n.name: self.results[n.name] for n in nodes}

    def _start(self) -> None:
        """Start or join Ray, then check every live node sees a local cache (exit 2 before any work
        when one does not) and resolve ``resources.gpus: auto`` from the cluster's GPUs."""
        self._ray = ray_session(self.spec.ray.address, self.spec.ray.num_cpus)
        self._ray.__enter__()
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = [n for n in ray.nodes() if n.get("Alive")]
        if self.store.identity is not None and len(alive) > 1:
            probe = ray.remote(check_shared)
            refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(self.store.root), self.store.identity) for n in alive]
            blind = [b for b in ray.get(refs) if b is not None]
            if blind:
                raise _not_shared(str(self.store.root), ", ".join(blind))
        want = self.spec.resources.gpus
        has_gpu = any(float(n["Resources"].get("GPU", 0)) > 0 for n in alive)
        self._gpus = (1.0 if has_gpu else 0.0) if want == "auto" else float(want)

    def task_options(self, stage: str, cpus_cap: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ray options of one stage's task, and the compute it is told (device, precision)."""
        sdef = STAGES[stage]
        res = self.spec.resources.stages.get(stage)
        gpus = self._gpus if stage in GPU_STAGES else 0.0
        if res is not None and res.gpus is not None:
            gpus = res.gpus
        cpus = res.cpus if res is not None and res.cpus is not None else min(sdef.num_cpus, cpus_cap)
        compute: dict[str, Any] = {"gpus": gpus or 0.0, "precision": self.spec.resources.precision}
        if stage == "distill" and self.spec.distill is not None and self.spec.distill.workers > 1:
            # The task only coordinates: its Ray Train workers hold the CPUs and GPUs asked for.
            worker_cpus = res.cpus if res is not None and res.cpus is not None else 1
            compute.update(worker_cpus=worker_cpus, max_failures=self.spec.ray.max_retries)
            cpus, gpus = 0, 0.0
        opts: dict[str, Any] = {"num_cpus": cpus, "max_retries": self.spec.ray.max_retries}
        if gpus:
            opts["num_gpus"] = gpus
        if res is not None and res.custom:
            opts["resources"] = dict(res.custom)
        if self.store.remote is not None and (env := client_env()):
            # The store the driver checked, reached the same way from every node (a joined cluster's
            # workers do not inherit the driver's environment).
            opts["runtime_env"] = {"env_vars": env}
        return opts, compute

    def _execute(self, todo: list[PlanNode]) -> dict[str, dict[str, Any]]:
        if self._ray is None:
            self._start()
        import ray
        from ray.dag import MultiOutputNode

        # A task must fit on one node: cap requests by the largest live node, not the cluster total.
        cpus = max([1.0] + [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")])
        task = ray.remote(execute_node)
        bound: dict[str, Any] = {}
        names = {n.name for n in todo}
        for node in todo:
            opts, compute = self.task_options(node.stage, cpus)
            upstream = [bound[n] if n in names else self.results[n] for n in node.inputs.values()]
            bound[node.name] = task.options(**opts).bind(str(self.store.root), asdict(node), *upstream,
                                                         store_id=self.store.identity, compute=compute)
        dag = MultiOutputNode([bound[n.name] for n in todo])
        for node in todo:
            log.info("%s: queued (%s)", node.name, node.key)
        results: dict[str, dict[str, Any]] = {}
        try:
            with warnings.catch_warnings():
                # Ray 2.60 marks DAGNode.execute() deprecated without a replacement for task DAGs.
                warnings.filterwarnings("ignore", message="DAGNode.execute")
                refs: Any = dag.execute()
            pending = list(refs)
            while pending:  # one driver-side line per stage as it finishes
                done, pending = ray.wait(pending, num_returns=1)
                r = ray.get(done[0])
                results[r["name"]] = r
                log.info("%s: %s in %.1fs", r["name"], "finished" if r["status"] == "run" else "cached",
                         r["seconds"])
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        return {n.name: results[n.name] for n in todo}

    def close(self) -> None:
        if self._ray is not None:
            self._ray.__exit__(None, None, None)
            self._ray = None
