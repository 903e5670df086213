"""mlpfuse from Python: the demo's job as a script (SmolLM2-135M, 80 % of its parameters).

    .venv/bin/python examples/python_api.py [OUTPUT_DIR]

Runs the same pipeline as ``mlpfuse run`` (embedded Ray on 127.0.0.1, stages cached under
~/.cache/mlpfuse, so a second run is all cache hits), prints what won and why, then loads the
compressed checkpoint and generates a few tokens with it.
"""

from __future__ import annotations

import sys

import mlpfuse


def main(output: str = "runs/python-api") -> None:
    plan = mlpfuse.plan(model="smollm2-135m", data="shakespeare", target=0.8, methods=["prune", "fusion"])
    print(f"{len(plan.stages)} base stages, {sum(s.cached for s in plan.stages)} cached; "
          f"{len(plan.candidates) or 'unsized'} candidates")
    result = mlpfuse.compress(model="smollm2-135m", data="shakespeare", target=0.8, methods=["prune", "fusion"],
                              output=output, evaluate={"window": 256, "stride": 128},
                              budget={"halving": {"min_tokens": 512}})
    print(f"base perplexity {result.base_perplexity:.3f}; winner {result.winner}: "
          f"{result.perplexity:.3f} at {result.params:,} of {result.base_params:,} parameters")
    print(result.reason)

    from transformers import AutoTokenizer

    assert result.export_path is not None  # a budget run always exports its winner
    model = mlpfuse.load(result.export_path)
    tok = AutoTokenizer.from_pretrained(result.export_path)
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    print(tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0]))


if __name__ == "__main__":
    main(*sys.argv[1:2])
