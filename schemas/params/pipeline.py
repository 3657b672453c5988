"""The whole pipeline's parameters: one model composed of the stage models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.algorithms import ALGORITHMS, AlgorithmName, estimator_for
from schemas.params.data import DataParams
from schemas.params.evaluate import EvalParams
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.params.rollout import RolloutParams
from schemas.params.update import UpdateParams, WarmstartParams


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
        return self
