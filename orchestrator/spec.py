"""Pipeline spec: YAML -> validated, typed configs. Unknown keys are errors naming the closest
valid key; nothing in a spec names code to import."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlpfuse.core.errors import InputError
from mlpfuse.orchestrator.budget import BudgetSpec
from mlpfuse.stages.collect import CollectConfig
from mlpfuse.stages.data import TokenizeConfig
from mlpfuse.stages.distill import DistillStageConfig
from mlpfuse.stages.evaluate import EvaluateConfig
from mlpfuse.stages.export import ExportConfig
from mlpfuse.stages.registry import STAGES
from mlpfuse.stages.samples import SamplesConfig
from mlpfuse.stages.shard import ShardConfig
from mlpfuse.stages.similarity import SimilarityConfig


class SpecError(InputError):
    pass


class RaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: start an embedded Ray bound to 127.0.0.1. "auto" or host:port: join that cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    # Retries of a stage task whose worker died (the stage resumes from its committed parts).
    max_retries: int = Field(2, ge=0)


# Stages whose work is forward passes and dense linear algebra: with ``resources.gpus: auto`` each
# of their tasks asks for one GPU when the cluster has GPUs.
GPU_STAGES = ("collect_part", "evaluate", "prefix", "probe", "samples", "compress", "damage", "similarity", "layer_errors",
              "distill")


class StageResources(BaseModel):
    """What one stage's tasks ask Ray for (None: the stage's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    # Ray custom resources (e.g. {"highmem": 1} to pin a stage to nodes started with that resource).
    custom: dict[str, float] = {}


class ResourcesSpec(BaseModel):
    """Where stage tasks run and in what precision. Not part of any cache key: an artifact is
    reused whichever device computed it (``--force STAGE`` recomputes one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # GPUs per task of the GPU stages (fractions share a device): "auto" asks for one when the
    # cluster has any GPU, else none; 0 keeps every stage on CPUs.
    gpus: float | Literal["auto"] = Field("auto")
    # Forward passes' precision. "auto": the checkpoint's stored precision (bf16, fp16) on a GPU,
    # float32 on CPUs. Statistics, solves and k-means accumulate in float32/float64 whatever it is.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Per-stage overrides, by stage name (shard, data, collect_part, collect, evaluate, prefix,
    # probe, compress, similarity, layer_errors, export, distill).
    stages: dict[str, StageResources] = {}

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and v < 0:
            raise ValueError("resources.gpus must be 'auto' or a number >= 0")
        return v

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        for name in v:
            if name not in STAGES:
                close = difflib.get_close_matches(name, list(STAGES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown stage {name!r}{hint} (stages: {', '.join(STAGES)})")
        return v


class ShardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = "auto"
    # Executes code shipped with a hub checkpoint; off unless the user opts in.
    trust_remote_code: bool = False


class DataSpec(BaseModel):
    """``data:`` is a corpus name/path, or this mapping (TokenizeConfig without derived keys)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A corpus (bundled name, path, hf:ID), or a list of them mixed for calibration.
    corpus: str | tuple[str, ...] = "shakespeare"
    # Relative calibration share of each corpus (default equal).
    weights: tuple[float, ...] = ()
    # Corpora held out whole from calibration and only evaluated on (the kinds it never saw).
    unseen: tuple[str, ...] = ()
    block_size: int = TokenizeConfig.model_fields["block_size"].default
    calib_tokens: int = TokenizeConfig.model_fields["calib_tokens"].default
    eval_tokens: int = TokenizeConfig.model_fields["eval_tokens"].default
    eval_fraction: float = TokenizeConfig.model_fields["eval_fraction"].default
    seed: int = 0
    text_field: str = "text"

    @model_validator(mode="after")
    def _mix(self) -> DataSpec:
        TokenizeConfig(**self.model_dump())  # the corpus list, weights and unseen sets agree
        return self


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "mlpfuse"
    model: str
    data: DataSpec = DataSpec()
    cache: str = "~/.cache/mlpfuse"
    # Where report.json (and later the exported model) go; relative to the working directory.
    output: str = "runs/{name}"
    ray: RaySpec = RaySpec()
    # CPUs, GPUs and custom Ray resources per stage task, and the forward passes' precision.
    resources: ResourcesSpec = ResourcesSpec()
    shard: ShardSpec = ShardSpec()
    collect: CollectConfig = CollectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # The CKA heat-map between FF sublayers (report.json similarity, similarity.png).
    similarity: SimilarityConfig = SimilarityConfig()
    # The prompts the base model and the budget's winner continue greedily, side by side in the report.
    samples: SamplesConfig = SamplesConfig()
    # A size budget: candidates of every method, scored side by side; the winner is exported.
    budget: BudgetSpec | None = None
    # How the winner is written (budget.export chooses stock vs tied).
    export: ExportConfig = ExportConfig()
    # Layer-wise distillation of the winner against the original model (DeepSpeed ZeRO).
    distill: DistillStageConfig | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _corpus_shorthand(cls, v: Any) -> Any:
        return {"corpus": v} if isinstance(v, str) else v

    @field_validator("evaluate")
    @classmethod
    def _whole_evaluations(cls, v: EvaluateConfig) -> EvaluateConfig:
        if v.after_tokens:
            raise ValueError("evaluate.after_tokens is set by successive halving for its later rounds; "
                             "a spec scores whole evaluations (leave it out)")
        return v

    @model_validator(mode="after")
    def _fails_later(self) -> PipelineSpec:
        """What would otherwise fail only once stages run."""
        if self.evaluate.stride > self.evaluate.window:
            raise ValueError(f"evaluate.stride={self.evaluate.stride} exceeds evaluate.window="
                             f"{self.evaluate.window}: tokens between windows would go unscored")
        if self.data.calib_tokens < self.data.block_size:
            raise ValueError(f"data.calib_tokens={self.data.calib_tokens} is less than one block of "
                             f"data.block_size={self.data.block_size}")
        if self.similarity.skip_positions >= self.data.block_size:
            raise ValueError(f"similarity.skip_positions={self.similarity.skip_positions} leaves nothing of "
                             f"blocks of data.block_size={self.data.block_size} tokens")
        if self.budget is None:
            for section in ("distill", "export"):
                if section in self.model_fields_set:
                    raise ValueError(f"{section}: applies to the winner of a budget; add a budget: section "
                                     "(e.g. budget: {target: {params: 0.8}}) or remove it")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[\w.-]+", v):
            raise ValueError(f"name {v!r} may hold only letters, digits, '.', '_' and '-'")
        if v.startswith("."):  # "..", "." or a hidden name: {name} in output: would leave its folder
            raise ValueError(f"name {v!r} may not start with '.'")
        return v

    @field_validator("output")
    @classmethod
    def _safe_output(cls, v: str) -> str:
        import string

        try:
            parts = [(f, fmt, conv) for _, f, fmt, conv in string.Formatter().parse(v) if f is not None]
            bad = [f + (f"!{conv}" if conv else "") + (f":{fmt}" if fmt else "") for f, fmt, conv in parts
                   if f != "name" or fmt or conv]
        except ValueError as e:
            raise ValueError(f"output {v!r} is not a valid path template ({e}); "
                             "the one placeholder is {name}") from None
        if bad:
            raise ValueError(f"output {v!r} uses {{{bad[0]}}}; the one placeholder is {{name}}")
        if ".." in Path(v).parts:
            raise ValueError(f"output {v!r} climbs out of its directory ('..'); give the path without it")
        return v

    def output_dir(self) -> Path:
        return Path(self.output.format(name=self.name)).expanduser()

    # Stage configs (the typed, frozen inputs of each stage's run()).
    def shard_config(self, source_key: str) -> ShardConfig:
        return ShardConfig(model=self.model, source_key=source_key, **self.shard.model_dump())

    def data_sets(self) -> list[str]:
        """The held-out evaluation sets: each calibration corpus, then each unseen one."""
        return TokenizeConfig(**self.data.model_dump()).eval_sets()

    def data_config(self) -> TokenizeConfig:
        """The data stage's config, with the fingerprint of every corpus it reads."""
        from mlpfuse.stages.data import mix_key

        cfg = TokenizeConfig(**self.data.model_dump())
        return cfg.model_copy(update={"corpus_key": mix_key(cfg)})


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Known keys of the (nested) model at ``loc``."""
    cls: Any = model
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        # Optional sections (`X | None`): the model inside the union.
        cls = next((a for a in typing.get_args(cls) if hasattr(a, "model_fields")), cls)
    return list(getattr(cls, "model_fields", {}))


def _format(e: ValidationError, source: str) -> str:
    lines = [f"invalid pipeline spec {source}:"]
    for err in e.errors():
        loc = tuple(x for x in err["loc"] if isinstance(x, str))
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(PipelineSpec, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  unknown key {where!r}{hint} (valid keys here: {', '.join(known)})")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_spec(obj: Any, source: str = "<spec>") -> PipelineSpec:
    if not isinstance(obj, dict):
        raise SpecError(f"invalid pipeline spec {source}: expected a mapping at the top level")
    try:
        return PipelineSpec.model_validate(obj)
    except ValidationError as e:
        raise SpecError(_format(e, source)) from None


def load_spec(path: str | Path) -> PipelineSpec:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"pipeline spec {str(p)!r} does not exist")
    try:
        obj = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"pipeline spec {p} is not valid YAML: {e}") from None
    return parse_spec(obj, str(p))
