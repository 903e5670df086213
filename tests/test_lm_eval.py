"""lm-eval-harness on an exported model: the shipped held-out perplexity task, checked against a
direct transformers computation; the held-out split matches the data stage's; input errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_with_tokenizer, write_corpus

from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.cli import main
from mlpfuse.orchestrator.lm_eval_run import heldout_documents, run_lm_eval

MAX_LENGTH = 16  # small windows, so a document spans several (the last one partial)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Path) -> Path:
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    path.mkdir()
    return tiny_llama_with_tokenizer(path, smollm2_tokenizer, layers=2)


def direct_loglikelihood(model_dir: Path, text: str, max_length: int) -> float:
    """Sum of log p(token | preceding tokens) over the whole document, in disjoint windows of
    ``max_length`` predictions: the first window is conditioned on the BOS (else EOS) token, each
    later one on the ``max_length`` tokens before its last prediction."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total = 0.0
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        inp = [prefix] + ids[: end - 1] if start == 0 else ids[end - 1 - max_length: end - 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), dim=-1)
        n = end - start
        target = torch.tensor(ids[start:end])
        total += logp[-n:].gather(1, target[:, None]).sum().item()
    return total


def test_shipped_task_matches_direct_perplexity(tiny_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
             "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
             "and by opposing end them. To die: to sleep; no more.",
             "Now is the winter of our discontent made glorious summer by this sun of York; and all "
             "the clouds that lour'd upon our house in the deep bosom of the ocean buried.",
             "A third document that --limit 2 leaves out."]
    docs = tmp_path / "heldout.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "results.json"
    rc = main(["lm-eval", str(tiny_model), "--data", str(docs), "--limit", "2",
               "--max-length", str(MAX_LENGTH), "--output", str(out)])
    assert rc == 0
    assert "word_perplexity" in capsys.readouterr().out
    res = json.loads(out.read_text())["mlpfuse_heldout"]
    assert res["docs"] == 2
    wp = res["word_perplexity"]
    assert math.isfinite(wp) and wp > 1
    # word_perplexity = exp(-sum(loglikelihood) / sum(words)): recover the total loglikelihood.
    words = sum(len(re.split(r"\s+", t)) for t in texts[:2])
    n_bytes = sum(len(t.encode()) for t in texts[:2])
    lm_eval_ll = -math.log(wp) * words
    direct = sum(direct_loglikelihood(tiny_model, t, MAX_LENGTH) for t in texts[:2])
    # float32 forward passes on both sides: they agree to ~1e-7; one-window scoring differs by ~1e-4.
    assert lm_eval_ll == pytest.approx(direct, rel=1e-6)
    assert res["byte_perplexity"] == pytest.approx(math.exp(-direct / n_bytes), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(-direct / n_bytes / math.log(2), rel=1e-6)


def test_heldout_split_matches_data_stage(tiny_model: Path, tmp_path: Path) -> None:
    from mlpfuse.stages import data

    corpus = write_corpus(tmp_path / "corpus", docs=10)
    data.run(data.TokenizeConfig(corpus=str(corpus), calib_tokens=1024, eval_tokens=5000, block_size=512),
             {"shard": tiny_model}, tmp_path / "data")
    split = json.loads((tmp_path / "data" / "split.json").read_text())["sets"][str(corpus)]
    held = heldout_documents(str(corpus))
    assert [d for d, _ in held] == split["eval_docs"]  # eval_tokens needs every held-out document
    assert not set(split["calib_docs"]) & {d for d, _ in held}
    one = heldout_documents(str(corpus / "doc3.txt"))  # a file: all of it, one document
    assert [d for d, _ in one] == ["doc3"]


def test_unknown_task_is_input_error(tiny_model: Path) -> None:
    with pytest.raises(InputError, match="no_such_task_xyz"):
        run_lm_eval(tiny_model, ["no_such_task_xyz"])


def test_cli_missing_model_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["lm-eval", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
