"""Plan a spec into stage nodes with cache keys, and execute them as a Ray DAG.

Every key is known before anything runs (a key hashes the stage, its version, its config and its
inputs' keys; the checkpoint and corpus enter through fingerprints of their files), so
``mlpfuse plan`` tells what is cached without running. Execution wraps the plain stage functions
with ``ray.remote`` at this edge only: resources, retries of dead workers, and caching.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import PipelineSpec
from orchestrator.store import ArtifactStore, cache_key
from stages.checkpoint import resolve_source, source_key
from stages.collect import CollectPartConfig
from stages.data import corpus_key
from stages.errors import InputError
from stages.registry import STAGES

# Ray listens on loopback only, reports no usage, and needs no auth token for local jobs.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


@dataclass(frozen=True)
class PlanNode:
    name: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]  # role -> upstream node name
    key: str
    input_keys: dict[str, str] = field(default_factory=dict)


def build_plan(spec: PipelineSpec) -> list[PlanNode]:
    """The stage nodes of ``spec`` in dependency order, each with its cache key."""
    nodes: dict[str, PlanNode] = {}

    def add(name: str, stage: str, config: Any, inputs: dict[str, str] | None = None) -> None:
        inputs = inputs or {}
        sdef = STAGES[stage]
        cfg = config.model_dump(mode="json")
        input_keys = {role: nodes[n].key for role, n in inputs.items()}
        nodes[name] = PlanNode(name, stage, cfg, inputs, cache_key(stage, sdef.version, cfg, input_keys), input_keys)

    add("shard", "shard", spec.shard_config(source_key(resolve_source(spec.model))))
    add("data", "data", spec.data_config(corpus_key(spec.data.corpus)), {"shard": "shard"})
    add("evaluate", "evaluate", spec.evaluate, {"shard": "shard", "data": "data"})
    # collect: one node per data-parallel worker, then an exact merge.
    workers = spec.collect.num_workers
    for w in range(workers):
        part = CollectPartConfig(**spec.collect.model_dump(), worker=w)
        add(f"collect.part{w}", "collect_part", part, {"shard": "shard", "data": "data"})
    add("collect", "collect", spec.collect, {"shard": "shard", **{f"part{w}": f"collect.part{w}" for w in range(workers)}})
    return list(nodes.values())


def execute_node(store_root: str, node: dict[str, Any], *upstream: dict[str, Any]) -> dict[str, Any]:
    """Run one node as a plain function: cache hit, or compute under the key's lock and commit.
    Inside a Ray task this is the whole task body."""
    store = ArtifactStore(store_root)
    stage, key = node["stage"], node["key"]
    inputs = {role: Path(u["path"]) for role, u in zip(node["inputs"], upstream, strict=True)}
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
                try:
                    result = sdef.run(cfg, inputs, staging)
                except InputError:
                    shutil.rmtree(staging, ignore_errors=True)  # bad input: nothing worth resuming
                    raise
                manifest = {
                    "stage_version": sdef.version, "config": node["config"], "inputs": node["input_keys"],
                    "result": result, "seconds": round(time.time() - t0, 3),
                }
                art = store.commit(stage, key, staging, manifest)
                return {"name": node["name"], "stage": stage, "key": key, "path": str(art.path),
                        "status": "run", "seconds": time.time() - t0, "result": result}
    return {"name": node["name"], "stage": stage, "key": key, "path": str(art.path), "status": "hit",
            "seconds": time.time() - t0, "result": art.manifest.get("result", {})}


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
        ray.init(
            num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
            _node_ip_address="127.0.0.1", log_to_driver=True,
            runtime_env={"env_vars": dict(RAY_ENV)},
        )
    try:
        yield
    finally:
        ray.shutdown()


def _unwrap(e: BaseException) -> BaseException:
    """The stage's own exception inside Ray's wrapper (so bad input still exits with 2)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def execute_plan(spec: PipelineSpec, plan: list[PlanNode], store: ArtifactStore, force: set[str]) -> dict[str, dict]:
    """Execute ``plan`` as one Ray DAG; returns each node's result by name."""
    import ray
    from ray.dag import MultiOutputNode

    for node in plan:
        if node.stage in force or node.name in force:
            store.remove(node.stage, node.key)
    cached = {n.name: store.get(n.stage, n.key) for n in plan}
    if all(cached.values()):  # nothing to run: no need to start Ray
        return {
            n.name: {"name": n.name, "stage": n.stage, "key": n.key, "path": str(a.path), "status": "hit",
                     "seconds": 0.0, "result": a.manifest.get("result", {})}
            for n in plan if (a := cached[n.name]) is not None
        }
    with ray_session(spec.ray.address, spec.ray.num_cpus):
        cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(execute_node)
        bound: dict[str, Any] = {}
        for node in plan:
            sdef = STAGES[node.stage]
            opts = {"num_cpus": min(sdef.num_cpus, cpus), "max_retries": spec.ray.max_retries}
            bound[node.name] = task.options(**opts).bind(
                str(store.root), asdict(node), *[bound[n] for n in node.inputs.values()]
            )
        dag = MultiOutputNode([bound[n.name] for n in plan])
        try:
            results = ray.get(dag.execute())
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
    return {r["name"]: r for r in results}
