"""The whole pipeline's parameters: one model composed of the stage models."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.algorithms import ALGORITHMS, AlgorithmName, estimator_for
from schemas.params.data import DataParams
from schemas.params.evaluate import EvalParams
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.params.rollout import RolloutParams
from schemas.params.update import UpdateParams, WarmstartParams

# the pipeline's stages by name (kept equal to stages.PIPELINE_STAGES: tests/test_dispatch.py checks it)
StageName = Literal["data", "warmstart", "rollout", "score", "advantages", "update", "evaluate"]
_POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class DispatchParams(BaseModel):
    """Where each stage runs: in the pipeline's own process (no pool: the default), or as a flow run of its
    own of the ``turntree-stage-step/step-<pool>`` deployment on a Prefect work pool (``turntree deploy --pool
    <pool>`` registers it). How a run is executed, not what it computes: left out of the run id and manifest."""

    model_config = ConfigDict(extra="forbid")

    pools: dict[StageName, str] = Field(
        default_factory=dict,
        description="stage -> work pool, e.g. {rollout: gpu, update: gpu, score: cpu}; unlisted stages: `default`",
    )
    default: str | None = Field(
        None, description="work pool of the stages not in `pools` (none: they run in the pipeline's process)"
    )

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, v: dict[str, str]) -> dict[str, str]:
        for stage, pool in v.items():
            cls._pool_names_one(pool, f"pools.{stage}")
        return v

    @field_validator("default")
    @classmethod
    def _default_name(cls, v: str | None) -> str | None:
        return v if v is None else cls._pool_names_one(v, "default")

    @staticmethod
    def _pool_names_one(pool: str, where: str) -> str:
        if not isinstance(pool, str) or not _POOL.match(pool):
            raise ValueError(f"{where}: {pool!r} is not a work pool name (letters, digits, '.', '_', '-')")
        return pool

    def pool_for(self, stage: str) -> str | None:
        """The work pool ``stage`` is dispatched to, or None (in-process)."""
        return self.pools.get(stage, self.default)  # type: ignore[call-overload]

    @staticmethod
    def deployment(pool: str) -> str:
        """The stage-step deployment of ``pool`` (``turntree deploy --pool <pool>`` registers it)."""
        return f"turntree-stage-step/step-{pool}"

    def used_pools(self, stages: tuple[str, ...]) -> list[str]:
        return sorted({p for s in stages if (p := self.pool_for(s))})


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: AlgorithmName = Field(
        "gtpo", description="grpo: outcome reward; gtpo: turn-level TIR; murphy: feedback trees"
    )
    model: str = Field(
        "smollm2",
        description="Policy: 'smollm2' (prepared offline), 'tiny' (random, for plumbing) or a model directory",
    )
    run_root: str = Field("runs", description="Root of run storage: a directory or a pyarrow URI (s3://…)")
    run_id: str | None = Field(None, description="Run id (default: generated); reuse one to resume a run")
    iterations: int = Field(1, ge=1, le=10_000, description="RL iterations")
    evaluate_every: int = Field(
        1, ge=0, description="Evaluate after every k-th iteration (0: only at the end)"
    )
    max_staleness: int = Field(
        0,
        ge=0,
        le=8,
        description="Asynchronous pipeline: with k ≥ 1 the next iteration's rollout runs while this iteration's "
        "update trains (on the newest weights the engine has), and no sample is trained on more than k policy "
        "versions after it was generated (stale samples are importance-weighted). 0: one stage after another",
    )
    prune_optimizer_states: bool = Field(
        False,
        description="Drop the optimizer state of every update checkpoint but the latest as the run goes (`turntree "
        "prune` after each iteration; ~1.1 of every 1.6 GB per SmolLM2 iteration). An earlier update can then no "
        "longer be rerun; evaluations, comparisons and resuming are unaffected. Study cells do this by default",
    )
    data: DataParams = Field(default_factory=DataParams)
    warmstart: WarmstartParams = Field(default_factory=WarmstartParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    advantages: AdvantageParams = Field(default_factory=AdvantageParams)
    update: UpdateParams = Field(default_factory=UpdateParams)
    eval: EvalParams = Field(
        default_factory=lambda: EvalParams(benchmark="heldout"),
        description="Evaluation after iterations; default: the eval split of this run's own problems",
    )
    dispatch: DispatchParams = Field(
        default_factory=DispatchParams,
        description="Run stages as flow runs on Prefect work pools (e.g. --set dispatch.pools.rollout=gpu)",
    )

    def identity(self) -> dict[str, Any]:
        """What the run computes, as recorded in its manifest: everything but the run id, the dispatch (where
        stages run does not change their outputs, so a run can resume on other pools) and whether superseded
        optimizer states are kept (no output reads them)."""
        return self.model_dump(mode="json", exclude={"run_id", "dispatch", "prune_optimizer_states"})

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_defaults_to_heldout(cls, v: Any) -> Any:
        """Inside a pipeline, an evaluation config without a benchmark evaluates the run's held-out problems."""
        if isinstance(v, dict) and "benchmark" not in v:
            return {**v, "benchmark": "heldout"}
        return v

    @model_validator(mode="after")
    def _apply_algorithm(self) -> PipelineParams:
        """The algorithm table (``schemas.algorithms``) picks the rollout kind and the estimator."""
        algo = ALGORITHMS[self.algorithm]
        self.rollout.kind = algo.rollout
        self.advantages.estimator = estimator_for(self.algorithm, self.advantages.estimator)
        self.update.max_staleness = self.max_staleness  # the update enforces the bound the pipeline keeps
        return self
