"""The CLI end to end on tiny checkpoints: bad input exits 2 with nothing cached; re-runs hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mlpfuse.orchestrator.cli import main
from tests.conftest import make_tiny


def _spec(tmp_path: Path, **over: object) -> Path:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(6):
            (corpus / f"doc{i}.txt").write_text(" ".join(f"word{j % 97} line {i}" for j in range(400)))
    spec = {
        "name": "t", "model": "smollm2-135m", "cache": str(tmp_path / "cache"), "output": str(tmp_path / "out"),
        "data": {"corpus": str(corpus), "block_size": 32, "calib_tokens": 128, "eval_tokens": 128},
        "evaluate": {"window": 32, "stride": 16},
    }
    spec.update(over)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _artifacts(tmp_path: Path) -> list[Path]:
    root = tmp_path / "cache" / "artifacts"
    return sorted(root.rglob("manifest.json")) if root.exists() else []


def test_unknown_key_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(_spec(tmp_path, evaluat={"window": 8}))]) == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().err
    assert _artifacts(tmp_path) == []


def test_wrong_type_exit_2(tmp_path: Path) -> None:
    assert main(["run", str(_spec(tmp_path, data={"block_size": "big"}))]) == 2


def test_missing_checkpoint_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(_spec(tmp_path, model=str(tmp_path / "nope")))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _artifacts(tmp_path) == []


def test_unsupported_architecture_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local) -> None:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    ckpt = tmp_path / "neox"
    AutoModelForCausalLM.from_config(
        GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    ).save_pretrained(ckpt)
    assert main(["run", str(_spec(tmp_path, model=str(ckpt)))]) == 2
    err = capsys.readouterr().err
    assert "gpt_neox" in err and "llama" in err
    assert _artifacts(tmp_path) == []
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


def test_corrupt_safetensors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = make_tiny("llama", tmp_path / "ckpt")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["run", str(_spec(tmp_path, model=str(ckpt)))]) == 2
    assert "corrupt safetensors" in capsys.readouterr().err
    assert _artifacts(tmp_path) == []


def test_corpus_too_short_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_local) -> None:
    spec = _spec(tmp_path, data={"corpus": "shakespeare", "calib_tokens": 10_000_000, "block_size": 64})
    assert main(["run", str(spec)]) == 2
    assert "calib_tokens=10000000" in capsys.readouterr().err
    # shard finished and is cached (valid work); the failing data stage left nothing behind
    assert [p.parent.parent.name for p in _artifacts(tmp_path)] == ["shard"]
    assert list((tmp_path / "cache" / "staging").iterdir()) == []


def test_run_twice_second_is_all_hits(tmp_path: Path, ray_local) -> None:
    spec = _spec(tmp_path)
    assert main(["run", str(spec)]) == 0
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {s["status"] for s in first["stages"].values()} == {"run"}
    assert first["base"]["perplexity"] > 1 and first["base"]["params"] > 100_000_000
    assert main(["run", str(spec)]) == 0
    second = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {s["status"] for s in second["stages"].values()} == {"hit"}
    assert second["base"] == first["base"]
    assert second["seconds"] < 0.1 * first["seconds"]
    assert main(["run", str(spec), "--force", "evaluate"]) == 0
    third = json.loads((tmp_path / "out" / "report.json").read_text())
    assert third["stages"]["evaluate"]["status"] == "run" and third["stages"]["shard"]["status"] == "hit"
    assert third["base"]["perplexity"] == pytest.approx(first["base"]["perplexity"], rel=1e-9)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from mlpfuse import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mlpfuse {__version__}"


@pytest.mark.parametrize(("over", "message"), [
    ({"evaluate": {"window": 32, "stride": 64}}, "evaluate.stride=64 exceeds evaluate.window=32"),
    ({"data": {"corpus": "shakespeare", "block_size": 64, "calib_tokens": 32}},
     "data.calib_tokens=32 is less than one block of data.block_size=64"),
    ({"export": {"dtype": "bfloat16"}}, "export: applies to the winner of a budget"),
    ({"distill": {"train": {"steps": 1, "lr": 1e-4, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1,
                            "checkpoint_every": 1, "seed": 0}, "max_blocks": 4}},
     "distill: applies to the winner of a budget"),
])
def test_what_would_fail_later_exits_2_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       over: dict, message: str) -> None:
    spec = _spec(tmp_path, **over)
    assert main(["run", str(spec)]) == 2
    assert message in capsys.readouterr().err
    assert _artifacts(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_single_long_text_is_cut_into_sections(tmp_path: Path, ray_local) -> None:
    """One .txt file of many paragraphs: split by whole sections, never mixing one between
    calibration and evaluation, and the report says so."""
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(" ".join(f"para{p} word{j % 53}" for j in range(60)) for p in range(80)))
    spec = _spec(tmp_path, data={"corpus": str(text), "block_size": 32, "calib_tokens": 128, "eval_tokens": 128})
    assert main(["run", str(spec)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    data_dir = Path(report["stages"]["data"]["path"])
    full = json.loads((data_dir / "split.json").read_text())
    split = full["sets"][str(text)]
    assert "cut into 20 sections" in full["note"] and report["data"]["note"] == full["note"]
    assert split["eval_docs"] and split["calib_docs"]
    assert not set(split["eval_docs"]) & set(split["calib_docs"])
    assert all(d.startswith("book§") for d in split["eval_docs"] + split["calib_docs"])
