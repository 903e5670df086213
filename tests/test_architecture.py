"""The import rules of ARCHITECTURE.md, checked on every module's source (function-level imports
included), and shown to fail on planted violations.

- ``mlpfuse.core`` (errors, atomic artifacts, heap policy) imports nothing else of mlpfuse;
- ``mlpfuse.stages.math`` (tensor math) imports no model code, no method and no stage;
- ``mlpfuse.stages.model`` (families, checkpoints, runner, overlays, HF I/O, trainer) imports no
  method and no stage;
- nothing under ``mlpfuse.stages`` imports ``mlpfuse.orchestrator`` or ``mlpfuse.cluster``;
- Ray is imported only in ``mlpfuse.orchestrator`` and ``mlpfuse.cluster``;
- stage modules import DeepSpeed, faiss and lm-eval only inside functions;
- nothing imports the bare folder names (``stages``, ``orchestrator``, ``cluster``): the one
  installed name is ``mlpfuse``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed name -> folder of the checkout (pyproject.toml's package-dir).
PACKAGES = {"mlpfuse": "mlpfuse", "mlpfuse.stages": "stages", "mlpfuse.orchestrator": "orchestrator",
            "mlpfuse.cluster": "cluster"}
BARE = ("stages", "orchestrator", "cluster")
STAGE_PARTS = ("mlpfuse.stages.math", "mlpfuse.stages.model", "mlpfuse.stages.methods")


def modules() -> dict[str, str]:
    """Every module of the package: installed name -> source."""
    out: dict[str, str] = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path.read_text()
    return out


def imported(name: str, source: str) -> set[str]:
    """Absolute names of every module ``source`` imports (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: -node.level]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def top_level_imports(source: str) -> set[str]:
    """Modules imported when the module itself is imported (its body, not its functions)."""
    found: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


#: Heavy or optional packages a stage module may use only inside its functions, so the stages
#: import (and run as plain functions) on a machine that lacks them, such as a bare GPU box.
DEFERRED = ("deepspeed", "faiss", "lm_eval")


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def _is_stage_module(mod: str) -> bool:
    """A stage file (``mlpfuse.stages.<stage>``) or the stage registry, not model/math/methods."""
    return _under(mod, "mlpfuse.stages") and mod != "mlpfuse.stages" and not any(
        _under(mod, p) for p in STAGE_PARTS)


def violations(mods: dict[str, str]) -> list[str]:
    bad: list[str] = []
    for name, source in mods.items():
        if _under(name, "mlpfuse.stages"):
            for dep in top_level_imports(source):
                if dep.split(".")[0] in DEFERRED:
                    bad.append(f"{name} imports {dep} at module level: import it where it is used")
        for dep in imported(name, source):
            top = dep.split(".")[0]
            if top in BARE:
                bad.append(f"{name} imports {dep}: use the installed name mlpfuse.{dep}")
            if top == "ray" and not (_under(name, "mlpfuse.orchestrator") or _under(name, "mlpfuse.cluster")):
                bad.append(f"{name} imports {dep}: Ray belongs in mlpfuse.orchestrator or mlpfuse.cluster")
            if not _under(dep, "mlpfuse"):
                continue
            if _under(name, "mlpfuse.core") and not _under(dep, "mlpfuse.core"):
                bad.append(f"{name} imports {dep}: the core imports nothing else of mlpfuse")
            if _under(name, "mlpfuse.stages") and (_under(dep, "mlpfuse.orchestrator") or _under(dep, "mlpfuse.cluster")):
                bad.append(f"{name} imports {dep}: stages import nothing from the orchestrator or cluster")
            if _under(name, "mlpfuse.stages.math") and _under(dep, "mlpfuse.stages") and not (
                    dep == "mlpfuse.stages" or _under(dep, "mlpfuse.stages.math")):
                bad.append(f"{name} imports {dep}: math imports no model code, method or stage")
            if _under(name, "mlpfuse.stages.model") and (
                    _under(dep, "mlpfuse.stages.methods") or _is_stage_module(dep)):
                bad.append(f"{name} imports {dep}: the model side imports no method or stage")
    return bad


def test_the_package_keeps_its_import_rules() -> None:
    mods = modules()
    assert {"mlpfuse.core.errors", "mlpfuse.stages.math.ffweights", "mlpfuse.stages.model.runner",
            "mlpfuse.stages.methods", "mlpfuse.stages.compress", "mlpfuse.cluster.ray_train"} <= set(mods)
    assert violations(mods) == []


@pytest.mark.parametrize(("name", "source", "rule"), [
    ("mlpfuse.stages.math.planted", "from mlpfuse.stages.model.runner import LayerStreamedModel", "math imports no"),
    ("mlpfuse.stages.math.planted", "def f():\n    from mlpfuse.stages import compress\n", "math imports no"),
    ("mlpfuse.stages.math.planted", "from ..model import families", "math imports no"),
    ("mlpfuse.stages.model.planted", "from mlpfuse.stages.collect import run_part", "model side imports no"),
    ("mlpfuse.stages.model.planted", "from mlpfuse.stages.methods import METHODS", "model side imports no"),
    ("mlpfuse.stages.planted", "from mlpfuse.orchestrator.spec import load_spec", "nothing from the orchestrator"),
    ("mlpfuse.stages.model.planted", "import ray", "Ray belongs"),
    ("mlpfuse.stages.planted", "def f():\n    from ray.train import ScalingConfig\n", "Ray belongs"),
    ("mlpfuse.core.planted", "from mlpfuse.stages.model.families import family_for", "the core imports nothing"),
    ("mlpfuse.orchestrator.planted", "from stages.compress import run", "use the installed name"),
    ("mlpfuse.stages.model.planted", "import deepspeed", "at module level"),
])
def test_a_planted_violation_fails(name: str, source: str, rule: str) -> None:
    found = violations({**modules(), name: source})
    assert found and all(rule in f for f in found), found


def test_allowed_imports_are_not_flagged() -> None:
    allowed = {
        "mlpfuse.stages.math.planted": "from mlpfuse.core.errors import InputError\nfrom .ffweights import FFWeights",
        "mlpfuse.stages.model.planted": "from mlpfuse.stages.math.ffweights import FFWeights",
        "mlpfuse.stages.planted": "from mlpfuse.stages.methods import METHODS",
        "mlpfuse.cluster.planted": "import ray\nfrom mlpfuse.stages.model.trainer import distill_worker",
    }
    assert violations({**modules(), **allowed}) == []
