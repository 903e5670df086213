"""samples: greedy continuations of a few fixed prompts (a fact, code, a story), so the report can
show what the base model and the winner actually write, beside the numbers.

The streamed runner generates without a KV cache (each new token re-runs the prompt and what was
generated so far); every prompt is a batch of its own, so no padding changes a position, and all of
them go through one pass over the layers per new token (each layer read once); with an ``overlay`` the
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
    ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in config.prompts]
    new: list[list[int]] = [[] for _ in ids]
    for _ in range(config.max_new_tokens):
        live = [j for j, t in enumerate(new) if not (t and t[-1] == eos)]
        if not live:
            break
        # Every unfinished prompt is its own batch, all carried through one pass over the layers.
        states = model.run([model.start(ids[j]) for j in live])
        for j, state in zip(live, states, strict=True):
            nxt = int(model.finish(state, keep_last=1)[0, -1].argmax())
            new[j].append(nxt)
            ids[j] = torch.cat([ids[j], torch.tensor([[nxt]])], dim=1)
    result = {"prompts": [{"prompt": p, "text": tokenizer.decode(t, skip_special_tokens=True), "tokens": t}
                          for p, t in zip(config.prompts, new, strict=True)]}
    write_json_atomic(out_dir / "samples.json", result)
    return result
