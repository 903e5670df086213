"""mlpfuse: compress the feed-forward sublayers of transformer LMs. ``mlpfuse.load`` reads an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(path: str | Path, **kwargs: Any) -> Any:
    """Load an mlpfuse export: the stock form through ``from_pretrained``; the tied form
    (``mlpfuse_ties.json``) with every tied window's layers sharing the same parameters."""
    from mlpfuse.stages.model.hf import load_export

    return load_export(path, **kwargs)
