"""lm-evaluation-harness on an exported model, offline, with local task files.

The shipped task ``mlpfuse_heldout`` (``mlpfuse/lm_eval_tasks/mlpfuse_heldout.yaml``) scores
whole documents with ``loglikelihood_rolling`` and reports word/byte perplexity and bits per byte.
Its documents are written at run time as a JSONL next to a filled-in copy of the YAML:

- ``data=None`` or a bundled corpus name (``shakespeare``) or a corpus directory: the documents the
  ``data`` stage holds out (same document split, seed and fraction as its defaults), whole;
- a ``.txt``/``.md`` file (one document), ``.jsonl`` (one per line, field ``text_field``) or
  ``.parquet`` (one per row): all of its documents.

Any other lm-eval task works when its data can be had offline (already in the datasets cache, or
a local task YAML under ``include_path``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mlpfuse.core.errors import DataError, InputError

SHIPPED_TASK = "mlpfuse_heldout"
PLACEHOLDER = "__MLPFUSE_DOCUMENTS_JSONL__"
DOC_FILE_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def task_template() -> Path:
    return Path(str(resources.files("mlpfuse") / "lm_eval_tasks" / f"{SHIPPED_TASK}.yaml"))


def heldout_documents(data: str | None = None, text_field: str = "text") -> list[tuple[str, str]]:
    """(doc id, text) pairs for the shipped task; see the module docstring for what ``data`` can be."""
    from mlpfuse.stages.data import (
        BUNDLED_CORPORA,
        TokenizeConfig,
        load_documents,
        sections_of_single_document,
        split_documents,
    )

    corpus = data or "shakespeare"
    path = Path(corpus).expanduser()
    if corpus not in BUNDLED_CORPORA and path.is_file():
        if path.suffix not in DOC_FILE_SUFFIXES:
            raise DataError(f"--data {corpus!r}: expected a {', '.join(DOC_FILE_SUFFIXES)} file, a corpus "
                            "directory or a bundled corpus name (shakespeare)")
        docs = load_documents(str(path), text_field)
    else:
        # The data stage's split, with its default seed and fraction.
        cfg = TokenizeConfig(corpus=corpus, text_field=text_field)
        docs, _ = sections_of_single_document(load_documents(corpus, text_field))
        docs, _ = split_documents(docs, cfg.eval_fraction, cfg.seed, corpus)
    if not docs:
        raise DataError(f"--data {corpus!r} holds no non-empty document")
    return docs


def write_task_dir(task_dir: Path, docs: list[tuple[str, str]]) -> Path:
    """The shipped task YAML with its data file filled in, and that JSONL, under ``task_dir``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    jsonl = task_dir / f"{SHIPPED_TASK}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for name, text in docs:
            f.write(json.dumps({"doc": name, "text": text}, ensure_ascii=False) + "\n")
    cfg = yaml.safe_load(task_template().read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(jsonl.resolve())
    # Keep the datasets cache of this run inside the run directory, not in ~/.cache.
    cfg["dataset_kwargs"]["cache_dir"] = str((task_dir / "datasets_cache").resolve())
    (task_dir / f"{SHIPPED_TASK}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return task_dir


def _model(model_dir: Path, dtype: str, batch_size: int, device: str, max_length: int | None) -> tuple[Any, str | None]:
    """(model for simple_evaluate, model_args): a stock export or checkpoint directory goes by
    name through ``hf``; a directory with only a GGUF file gets ``gguf_file``; a tied export
    (``mlpfuse_ties.json``) is loaded with ``mlpfuse.load`` and wrapped."""
    from mlpfuse.stages.model.hf import TIES_FILE

    extra = f",max_length={max_length}" if max_length else ""
    if (model_dir / TIES_FILE).exists():
        import torch
        from lm_eval.models.huggingface import HFLM

        from mlpfuse.stages.model.hf import load_export

        model = load_export(model_dir, dtype=getattr(torch, dtype))
        torch.nn.Module.to(model, device)
        return HFLM(pretrained=model, tokenizer=str(model_dir), batch_size=batch_size, device=device,
                    max_length=max_length), None
    if (model_dir / "config.json").exists():
        return "hf", f"pretrained={model_dir},dtype={dtype}{extra}"
    ggufs = sorted(model_dir.glob("*.gguf"))
    if ggufs:
        return "hf", f"pretrained={model_dir},gguf_file={ggufs[0].name},dtype={dtype}{extra}"
    raise InputError(f"{model_dir} is not a model directory (no config.json, no *.gguf); give an "
                     "export's model/ directory")


def _metrics(task_results: dict) -> dict[str, float]:
    out = {}
    for k, v in task_results.items():
        if k in ("alias", "sample_len") or "_stderr" in k or not isinstance(v, (int, float)):
            continue
        metric, _, flt = k.partition(",")
        out[metric if flt in ("", "none") else k] = float(v)
    return out


def run_lm_eval(model_dir: str | Path, tasks: Sequence[str] | str = (SHIPPED_TASK,), data: str | None = None,
                limit: int | None = None, batch_size: int = 1, device: str = "cpu", *,
                include_path: str | Path | None = None, dtype: str = "float32", text_field: str = "text",
                max_length: int | None = None, task_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``simple_evaluate`` on ``model_dir``; returns ``{task: {metric: value, "docs": n}}``
    (metric names without lm-eval's ``,none`` filter suffix). ``data`` feeds the shipped task only;
    ``task_dir`` keeps the generated task files (default: a temporary directory)."""
    from mlpfuse.stages.data import hub_offline

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise InputError(f"model directory {str(model_dir)!r} does not exist" if not model_dir.exists()
                         else f"{str(model_dir)!r} is a file; give the model directory")
    tasks = [t.strip() for t in ([tasks] if isinstance(tasks, str) else list(tasks)) if t.strip()]
    if not tasks:
        raise InputError("no lm-eval task given")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise InputError(f"include path {str(include_path)!r} is not a directory")

    with contextlib.ExitStack() as stack:
        stack.enter_context(hub_offline())
        if task_dir is None:
            task_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlpfuse-lm-eval-"))
        task_dir = Path(task_dir)
        paths = [task_dir]
        if include_path is not None:
            paths.append(Path(include_path).expanduser())
        if SHIPPED_TASK in tasks:
            write_task_dir(task_dir, heldout_documents(data, text_field))
        else:
            task_dir.mkdir(parents=True, exist_ok=True)

        import lm_eval
        from lm_eval.tasks import TaskManager

        # lm-eval's own task index takes ~10 s to build: only when a task is not ours.
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if any(t not in manager.all_tasks and not t.endswith(".yaml") for t in tasks):
            manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=True)
        unknown = [t for t in tasks if t not in manager.all_tasks and not (t.endswith(".yaml") and Path(t).is_file())]
        if unknown:
            hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
            hint = "; ".join(f"{t!r}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
            raise InputError(f"unknown lm-eval task(s) {', '.join(map(repr, unknown))}"
                             + (f" ({hint})" if hint else "")
                             + f"; the shipped task is {SHIPPED_TASK!r}, `lm_eval ls tasks` lists lm-eval's")

        model, model_args = _model(model_dir, dtype, batch_size, device, max_length)
        try:
            out = lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
                batch_size=batch_size, device=device, bootstrap_iters=0, log_samples=False,
            )
        except (FileNotFoundError, ConnectionError) as e:
            raise InputError(f"lm-eval could not load a task's data offline ({type(e).__name__}: {e}); "
                             "give the task a local dataset (dataset_path: json + data_files)") from e
    if out is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank?)")
    n = out.get("n-samples", {})
    result = {}
    for task, res in out["results"].items():
        m = _metrics(res)
        if task in n:
            m["docs"] = int(n[task].get("effective", n[task].get("original", 0)))
        result[task] = m
    return result


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [f"{'task':<24} {'metric':<18} {'value':>14}"]
    for task, metrics in results.items():
        for metric, v in metrics.items():
            if metric == "docs":
                continue
            val = f"{v:14.4f}" if math.isfinite(v) else f"{v!s:>14}"
            rows.append(f"{task:<24} {metric:<18} {val}")
        if "docs" in metrics:
            rows.append(f"{task:<24} {'docs':<18} {int(metrics['docs']):>14d}")
    return "\n".join(rows)
