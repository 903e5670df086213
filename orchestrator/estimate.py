"""What a run will cost, before it runs: each stage's disk, tokens and time, from the checkpoint's
metadata alone (its config and its files' sizes; no weights are read or downloaded).

The figures are estimates, stated with what they assume:

- disk: what each stage's artifact holds (shard: the checkpoint rewritten by layer; collect: the
  calibration features the spec keeps, at their dtype, plus float64 statistics and HᵀH where the
  block is narrow enough; candidates: one overlay each, at most the FF weights; export: the model
  at the budget; distill: the student plus its ZeRO checkpoint, 16 bytes per trained parameter);
- tokens: those each stage runs through the model (collect: the calibration; evaluate: the
  held-out split; distill: steps x micro-batches x workers x block);
- time: 2 FLOPs per active parameter per token for a forward pass (6 forward+backward, plus the
  teacher's 2, for distillation), at a stated rate: one GPU task at ``GPU_FLOPS`` (about 40 % of
  an H100's dense bf16 peak) or one CPU task at ``CPU_FLOPS`` (float32 on 16 cores). Streaming
  weights from disk, Parquet and k-means are not in it: read it as a floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlpfuse.orchestrator.spec import PipelineSpec

GPU_FLOPS = 4e14
CPU_FLOPS = 5e11
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a checkpoint, from its config."""

    layers: int
    hidden: int
    params: int
    active_params: int  # per token (MoE: the routed experts a token uses, not all of them)
    stored_bytes: int
    ff_width: int  # per-token FF width of a layer (MoE: top_k x expert width + shared width)
    experts: int  # routed experts per layer (0: dense)
    expert_width: int
    top_k: int
    shared_width: int
    ff_params: int

    @classmethod
    def from_config(cls, cfg: Any, stored_bytes: int) -> ModelShape:
        from mlpfuse.stages.model.shards import build_skeleton

        text = getattr(cfg, "text_config", None) or cfg
        layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
        skeleton = build_skeleton(cfg)  # meta tensors: no memory
        skeleton.tie_weights()  # tied embeddings count once
        params = sum(p.numel() for p in skeleton.parameters())
        experts = int(getattr(text, "num_local_experts", 0) or getattr(text, "num_experts", 0) or 0)
        glu = 3 if str(getattr(text, "hidden_act", "silu")) in ("silu", "swish", "gelu_pytorch_tanh") else 2
        if experts:
            ew = int(getattr(text, "moe_intermediate_size", 0) or text.intermediate_size)
            k = int(getattr(text, "num_experts_per_tok", 1))
            sw = int(getattr(text, "shared_expert_intermediate_size", 0) or 0)
            routed = layers * experts * glu * hidden * ew
            ff = routed + layers * glu * hidden * sw
            active = params - routed + routed * k // experts
            width = k * ew + sw
        else:
            ew = k = sw = 0
            width = int(text.intermediate_size)
            ff = layers * glu * hidden * width
            active = params
        return cls(layers, hidden, params, active, stored_bytes, width, experts, ew, k, sw, ff)


@dataclass(frozen=True)
class StageEstimate:
    name: str
    disk_bytes: int
    tokens: int
    flops: float
    gpu: bool  # a GPU stage (runs on one when the cluster has them)
    note: str = ""
    tasks: int = 1  # tasks or workers that share the work in parallel (collect's parts, distill's workers)

    def seconds(self, on_gpu: bool) -> float:
        return self.flops / (GPU_FLOPS if on_gpu and self.gpu else CPU_FLOPS) / self.tasks


def estimate(spec: PipelineSpec, shape: ModelShape) -> list[StageEstimate]:
    """Each stage a run of ``spec`` has, with its disk, tokens and FLOPs."""
    d, c = spec.data, spec.collect
    # eval_tokens per held-out set: one per calibration corpus and one per unseen corpus.
    eval_tokens = d.eval_tokens * len(spec.data_sets())
    per_param = shape.stored_bytes / max(shape.params, 1)
    out = [StageEstimate("shard", shape.stored_bytes, 0, 0.0, False, "the checkpoint, by layer"),
           StageEstimate("data", 4 * (d.calib_tokens + eval_tokens), 0, 0.0, False)]
    fwd = 2.0 * shape.active_params
    out.append(StageEstimate("evaluate", 0, eval_tokens, fwd * eval_tokens, True))
    # collect: per token and layer, every kept feature kind at its width, and x (float32).
    fb = _BYTES[c.dtype]
    per_token_layer = len(c.features) * shape.ff_width * fb + (4 * shape.hidden if c.inputs else 0)
    if shape.experts:
        per_token_layer += 4 * shape.experts + 8 * shape.top_k  # the router's table
    blocks = [(shape.experts, shape.expert_width), (1 if shape.shared_width else 0, shape.shared_width)] \
        if shape.experts else [(1, shape.ff_width)]
    stats = sum(n * (3 * 2 * 8 * w + (8 * w * w if w <= c.gram_max else 0)) for n, w in blocks) * shape.layers
    feats = per_token_layer * shape.layers * d.calib_tokens
    kept = ", ".join(c.features) or "no features"
    out.append(StageEstimate("collect", feats + stats, d.calib_tokens, fwd * d.calib_tokens, True,
                             f"{kept} at {c.dtype}{', x at float32' if c.inputs else ''}; statistics "
                             f"{stats / 1e9:.1f} GB; "
                             f"{c.num_workers} part(s)", c.num_workers))
    out.append(StageEstimate("similarity", 0, 0, 0.0, True))
    if spec.budget is not None:
        target = spec.budget.target.params or spec.budget.target.ff_params or 0.8
        frac = target if target < 1 else target / shape.params
        ff_bytes = int(shape.ff_params * per_param * min(frac, 1.0))
        if spec.budget.damage is not None:
            # Per layer, two passes over the layers after it (about half the model on average).
            probe = spec.budget.damage.tokens
            out.append(StageEstimate("damage", 0, probe, fwd * probe * (1 + shape.layers), True,
                                     "each layer pruned alone and dropped: two partial forwards a layer"))
        # The planner sizes its variants once collect has run; the demo's four families gave 16.
        n = 3 * len(spec.budget.methods) + len(spec.budget.candidates)
        out.append(StageEstimate(f"compress (~{n} candidates)", n * ff_bytes, 0, 0.0, True,
                                 "an overlay each: the compressed FF weights"))
        out.append(StageEstimate("evaluate (candidates)", 0, n * eval_tokens, n * fwd * eval_tokens, True,
                                 "successive halving: at most every candidate on every held-out token"))
        export = int(shape.stored_bytes * min(frac, 1.0))
        out.append(StageEstimate("export", export, 0, 0.0, False, "the winner at the budget"))
        if spec.distill is not None:
            t = spec.distill.train
            tokens = t.steps * t.grad_accum * t.micro_batch * spec.distill.workers * d.block_size
            trained = shape.ff_params if t.trainable != "all" else shape.params
            flops = (2.0 + 6.0) * shape.active_params * tokens
            out.append(StageEstimate("distill", export + 16 * int(trained * min(frac, 1.0)), tokens, flops, True,
                                     f"{spec.distill.workers} worker(s), ZeRO-{t.zero_stage}; its checkpoint: "
                                     "16 bytes per trained parameter", spec.distill.workers))
    return out


def format_estimates(estimates: list[StageEstimate], shape: ModelShape) -> list[str]:
    lines = [f"model: {shape.params / 1e9:.2f} B parameters ({shape.active_params / 1e9:.2f} B active per token), "
             f"{shape.layers} layers, stored {shape.stored_bytes / 1e9:.1f} GB; FF width per token {shape.ff_width}"
             + (f" ({shape.top_k} of {shape.experts} experts of {shape.expert_width})" if shape.experts else ""),
             f"  {'stage':<28} {'disk':>10} {'tokens':>12} {'GPUs':>9} {'CPUs':>9}"]
    total = 0
    for e in estimates:
        total += e.disk_bytes
        gpu = _time(e.seconds(True)) if e.flops else "-"
        cpu = _time(e.seconds(False)) if e.flops else "-"
        lines.append(f"  {e.name:<28} {_size(e.disk_bytes):>10} {e.tokens:>12,} {gpu:>9} {cpu:>9}"
                     + (f"  {e.note}" if e.note else ""))
    lines.append(f"  {'total disk':<28} {_size(total):>10}   (times: model FLOPs at {GPU_FLOPS / 1e12:.0f} "
                 f"TFLOP/s per GPU task or {CPU_FLOPS / 1e12:.1f} per CPU task, parallel parts and workers "
                 "dividing; a floor)")
    return lines


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"
