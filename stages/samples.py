"""samples: greedy continuations of a few fixed prompts (a fact, code, a story), so the report can
show what the base model and the winner actually write, beside the numbers.

The streamed runner generates without a KV cache (each new token re-runs the prompt and what was
generated so far), one prompt at a time, so no padding changes a position; with an ``overlay`` the
candidate's layers stand in for the base's. Output: ``samples.json`` ({"prompts": [{"prompt",
"text", "tokens"}]}).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
)


class SamplesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = Field(20, ge=1, le=256)


@torch.no_grad()
def run(config: SamplesConfig, inputs: dict[str, Path], out_dir: Path) -> dict:
    """Inputs: ``shard`` (the base model), optionally ``overlay`` (a candidate)."""
    from transformers import AutoTokenizer

    from mlpfuse.core.artifacts import write_json_atomic
    from mlpfuse.stages.model.overlay import load_overrides
    from mlpfuse.stages.model.runner import LayerStreamedModel

    tokenizer = AutoTokenizer.from_pretrained(inputs["shard"])
    model = LayerStreamedModel(inputs["shard"], overrides=load_overrides(inputs.get("overlay")))
    eos = tokenizer.eos_token_id
    out = []
    for prompt in config.prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new: list[int] = []
        for _ in range(config.max_new_tokens):
            (state,) = model.run([model.start(ids)])
            nxt = int(model.finish(state, keep_last=1)[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "tokens": new})
    result = {"prompts": out}
    write_json_atomic(out_dir / "samples.json", result)
    return result
