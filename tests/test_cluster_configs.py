"""Every shipped cluster config parses and has the structure its consumer expects: DeepSpeed ZeRO
JSONs (through DeepSpeed's own validators), the `ray up` YAML (through Ray's cluster schema), the
KubeRay RayJob manifest (and the pipeline spec inside it), local settings and the runtime env."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlpfuse.cluster.runtime_env import CODE_EXCLUDES, JOB_ENV_VARS, package_dir, runtime_env
from mlpfuse.core.errors import InputError
from mlpfuse.stages.model.zero import ZERO_CONFIG_FILES, fit_buckets, zero_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO


@pytest.mark.parametrize("stage", sorted(ZERO_CONFIG_FILES))
def test_shipped_zero_json(stage):
    raw = json.loads(ZERO_CONFIG_FILES[stage].read_text())
    assert raw["zero_optimization"]["stage"] == stage
    # The run-dependent values are left for zero_config to fill; nothing else is null.
    assert (
        raw["train_micro_batch_size_per_gpu"] is None and raw["gradient_accumulation_steps"] is None
    )
    assert raw["bf16"] == {"enabled": None}
    assert "optimizer" not in raw and "scheduler" not in raw  # distill passes a client AdamW
    assert raw["zero_allow_untested_optimizer"] is True
    assert "train_batch_size" not in raw  # derived from micro batch x accumulation x world size


@pytest.mark.parametrize("stage", sorted(ZERO_CONFIG_FILES))
@pytest.mark.parametrize("offload", [False, True])
def test_zero_config_validates_with_deepspeed(stage, offload):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    if offload and stage == 0:
        with pytest.raises(ValueError, match="stage 2 or 3"):
            zero_config(stage, micro_batch=2, grad_accum=4, offload_optimizer=True)
        return
    config = zero_config(stage, micro_batch=2, grad_accum=4, offload_optimizer=offload, bf16=True)
    assert (
        config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    )
    assert config["bf16"]["enabled"] is True
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # extra="forbid": catches typos
    assert zero.stage == stage
    if offload:
        assert zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"
        assert config["zero_force_ds_cpu_optimizer"] is False
    else:
        assert zero.offload_optimizer is None
    # zero_config hands out copies: the shipped dict is never mutated.
    assert zero_config(stage, micro_batch=1, grad_accum=1)["train_micro_batch_size_per_gpu"] == 1
    assert (
        "offload_optimizer"
        not in zero_config(stage, micro_batch=1, grad_accum=1)["zero_optimization"]
    )


def test_zero_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"unknown ZeRO stage 1.*\[0, 2, 3\]"):
        zero_config(1, micro_batch=1, grad_accum=1)
    with pytest.raises(ValueError, match="micro_batch"):
        zero_config(2, micro_batch=0, grad_accum=1)
    with pytest.raises(ValueError, match="grad_accum"):
        zero_config(2, micro_batch=1, grad_accum=True)


def test_fit_buckets():
    z3 = fit_buckets(zero_config(3, micro_batch=1, grad_accum=1), hidden_size=4096)[
        "zero_optimization"
    ]
    assert z3["reduce_bucket_size"] == 4096**2
    assert z3["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert z3["stage3_param_persistence_threshold"] == 40960
    z2 = fit_buckets(zero_config(2, micro_batch=1, grad_accum=1), hidden_size=32)[
        "zero_optimization"
    ]
    assert z2["reduce_bucket_size"] == z2["allgather_bucket_size"] == 1024
    assert fit_buckets(zero_config(0, micro_batch=1, grad_accum=1), hidden_size=32)[
        "zero_optimization"
    ] == {"stage": 0}


# ---------------------------------------------------------------------------------------------
# Ray clusters


def test_ray_up_gpu_yaml():
    import jsonschema
    import ray.autoscaler

    config = load_yaml("ray-up-gpu.yaml")
    # Ray's cluster-config schema (what `ray up` validates against before filling in defaults).
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert "docker" not in config
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(types) == {"head", "gpu_worker"}
    assert types["gpu_worker"]["max_workers"] <= config["max_workers"]
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(
        ("g", "p")
    )  # GPU instances
    assert config["file_mounts"] == {"~/mlpfuse": "."}
    assert {".venv", ".git"} <= set(config["rsync_exclude"])
    setup = "\n".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "-c ~/mlpfuse/constraints.txt -e ~/mlpfuse" in setup
    assert "/mnt/mlpfuse" in setup  # the shared artifact store
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all(
        "--address=$RAY_HEAD_IP:6379" in c
        for c in config["worker_start_ray_commands"]
        if "start" in c
    )


def test_kuberay_rayjob_yaml():
    from mlpfuse.orchestrator.spec import parse_spec

    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"PersistentVolumeClaim", "ConfigMap", "RayJob"}

    pvc = by_kind["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    job = by_kind["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == "mlpfuse run /specs/pipeline.yaml --address auto"
    from mlpfuse.cluster.runtime_env import JOB_ENV_VARS

    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"] == JOB_ENV_VARS
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (gpu_group,) = cluster["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in (head, worker):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["artifacts"] == "/artifacts"
    # The dashboard binds the head pod's own cluster address (from the downward API), not 0.0.0.0.
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "$MY_POD_IP"
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["MY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    head_mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert head_mounts["specs"] == "/specs"
    assert {v["name"]: v for v in head["volumes"]}["specs"]["configMap"]["name"] == by_kind[
        "ConfigMap"
    ]["metadata"]["name"]

    # The pipeline spec the job runs is a valid spec whose store is on the shared volume.
    spec = parse_spec(
        yaml.safe_load(by_kind["ConfigMap"]["data"]["pipeline.yaml"]), "kuberay-rayjob.yaml"
    )
    assert spec.cache.startswith("/artifacts/") and spec.ray.address == "auto"
    # It compresses, exports and distils, on as many workers as the worker group has GPUs.
    assert spec.budget is not None and spec.distill is not None
    assert spec.distill.workers == gpu_group["replicas"] * int(worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def test_local_yaml_agrees_with_the_code():
    from mlpfuse.orchestrator.pipeline import RAY_ENV
    from mlpfuse.stages.model.process_group import DEFAULT_TORCH_EXTENSIONS_DIR
    from mlpfuse.stages.model.trainer import DistillConfig

    local = load_yaml("local.yaml")
    assert set(local) == {"env", "ray_init", "head", "distill"}
    env = local["env"]
    assert all(isinstance(v, str) for v in env.values())
    assert {k: env[k] for k in RAY_ENV} == RAY_ENV
    assert Path(env["TORCH_EXTENSIONS_DIR"]).expanduser() == DEFAULT_TORCH_EXTENSIONS_DIR
    assert (
        local["ray_init"]["_node_ip_address"] == "127.0.0.1" and local["ray_init"]["num_cpus"] >= 1
    )
    assert "--node-ip-address=127.0.0.1" in local["head"]["start"]
    assert "--dashboard-host=127.0.0.1" in local["head"]["start"]
    DistillConfig(**local["distill"], steps=1, lr=1e-4, checkpoint_every=1, seed=0)


def test_runtime_env(tmp_path):
    from ray.runtime_env import RuntimeEnv

    root = CLUSTER.parent
    pkg = package_dir(tmp_path / "pkg")
    env = runtime_env(root, pkg)
    assert env["working_dir"] == str(root) and env["py_modules"] == [str(pkg)]
    assert {".venv/", ".git/"} <= set(env["excludes"])
    # The checkout's code folders never travel in the working directory: a mlpfuse/ folder there
    # would shadow the shipped package on the workers.
    assert set(CODE_EXCLUDES) <= set(env["excludes"]) and "/mlpfuse/" in CODE_EXCLUDES
    assert env["env_vars"] == JOB_ENV_VARS and env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    RuntimeEnv(**env)  # Ray's own validation of the fields
    with pytest.raises(InputError, match="does not exist"):
        runtime_env(tmp_path / "missing")


def test_shipped_package_is_whole(tmp_path):
    """The package a job ships imports on its own: every part, the demo spec and the ZeRO configs."""
    import subprocess
    import sys

    pkg = package_dir(tmp_path / "pkg")
    for rel in ("stages/compress.py", "stages/model/zero3.json", "examples/smollm2-demo.yaml",
                "lm_eval_tasks/mlpfuse_heldout.yaml", "cluster/ray_train.py", "core/errors.py"):
        assert (pkg / rel).is_file(), rel
    assert not list(pkg.rglob("__pycache__"))
    code = ("import mlpfuse, mlpfuse.stages.registry, mlpfuse.orchestrator.cli;"
            "from mlpfuse.orchestrator.cli import demo_spec; print(mlpfuse.__file__, demo_spec().is_file())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(pkg.parent)},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(pkg / "__init__.py"), "True"]
