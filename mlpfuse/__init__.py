"""mlpfuse: compress the feed-forward sublayers of transformer LMs (dense and MoE).

The Python API (``mlpfuse.compress``, ``mlpfuse.plan``, ``mlpfuse.load``) runs the same pipeline
as the ``mlpfuse`` command. The package holds the shared core (``mlpfuse.core``), the stages
(``mlpfuse.stages``), the orchestrator (``mlpfuse.orchestrator``) and the cluster edge
(``mlpfuse.cluster``); see ARCHITECTURE.md. Importing ``mlpfuse`` loads none of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mlpfuse")
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from mlpfuse.api import CompressResult, Plan

__all__ = ["compress", "plan", "load", "__version__"]


def compress(*args: Any, **kwargs: Any) -> CompressResult:
    """Run the pipeline: see :func:`mlpfuse.api.compress`."""
    from mlpfuse.api import compress as run

    return run(*args, **kwargs)


def plan(*args: Any, **kwargs: Any) -> Plan:
    """The stages and candidates of a run, running nothing: see :func:`mlpfuse.api.plan`."""
    from mlpfuse.api import plan as make

    return make(*args, **kwargs)


def load(path: str | Path, **kwargs: Any) -> Any:
    """Load an mlpfuse export: the stock form through ``from_pretrained``; the tied form
    (``mlpfuse_ties.json``) with every tied window's layers sharing the same parameters."""
    from mlpfuse.stages.model.hf import load_export

    return load_export(path, **kwargs)
