"""The explicit list of stages: name -> what it needs, its config type and its plain function.

The orchestrator knows stages only through this contract: ``run(config, inputs, out_dir)`` takes a
frozen config, the local paths of its input artifacts by role, and a directory to write into; it
returns a small JSON-able result that goes into the manifest. Bump ``version`` when a stage's
output changes for the same config, so old cache entries stop matching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from mlpfuse.stages import (
    collect,
    compress,
    damage,
    data,
    distill,
    evaluate,
    export,
    layer_errors,
    samples,
    shard,
    similarity,
)


@dataclass(frozen=True)
class StageDef:
    name: str
    version: int
    config: type[BaseModel]
    # run(config, inputs, out_dir, **launchers): launchers are what the orchestrator lends a stage
    # from the cluster (distill's Ray Train trainer); a direct call passes none.
    run: Callable[..., dict]
    # Input roles, each the name of the upstream stage that fills it.
    inputs: tuple[str, ...] = ()
    num_cpus: float = 1


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in (
        StageDef("shard", 3, shard.ShardConfig, shard.run, num_cpus=2),
        StageDef("data", 2, data.TokenizeConfig, data.run, inputs=("shard",)),
        StageDef("collect_part", 2, collect.CollectPartConfig, collect.run_part, inputs=("shard", "data"), num_cpus=2),
        # Inputs: shard, part0..part{n-1} (one per collect_part worker).
        StageDef("collect", 2, collect.CollectConfig, collect.run_merge, inputs=("shard",)),
        StageDef("similarity", 1, similarity.SimilarityConfig, similarity.run, inputs=("shard", "collect")),
        # Inputs: shard, optionally collect (data-aware methods, refit).
        StageDef("compress", 6, compress.CompressConfig, compress.run, inputs=("shard",), num_cpus=2),
        # Each layer's damage at every width and when dropped (the planner's damage allocation).
        StageDef("damage", 1, damage.DamageConfig, damage.run, inputs=("shard", "collect", "data"), num_cpus=2),
        StageDef("evaluate", 2, evaluate.EvaluateConfig, evaluate.run, inputs=("shard", "data"), num_cpus=2),
        # Inputs: shard, optionally overlay (a candidate): greedy continuations of fixed prompts.
        StageDef("samples", 1, samples.SamplesConfig, samples.run, inputs=("shard",)),
        StageDef("probe", 1, layer_errors.ProbeConfig, layer_errors.run_probe, inputs=("shard", "data")),
        StageDef("layer_errors", 1, layer_errors.LayerErrorsConfig, layer_errors.run, inputs=("shard", "probe", "overlay")),
        # The base model's hidden states entering chosen layers, per evaluation window (prefix sharing).
        StageDef("prefix", 2, evaluate.PrefixConfig, evaluate.run_prefix, inputs=("shard", "data"), num_cpus=2),
        # Inputs: shard, optionally overlay (the candidate to export; absent: the base model).
        StageDef("export", 1, export.ExportConfig, export.run, inputs=("shard",)),
        # Inputs: teacher (export of the original), student (export of the winner), data, and
        # optionally overlay (the winner's, to map layers when some were dropped).
        StageDef("distill", 2, distill.DistillStageConfig, distill.run_stage, inputs=("teacher", "student", "data"),
                 num_cpus=2),
    )
}


def stage(name: str) -> StageDef:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None
