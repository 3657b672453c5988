"""The study file of ``turntree study --config configs/studies/<name>.yaml``: a grid of methods × seeds (× any
parameter), each cell one pipeline run, every cell of a grid point sharing the model, the problems, the warm
start and the evaluation (``stages.study.plan`` builds and checks the cells).

    name: smoke                        # optional: the prefix of the cells' run ids (default: the file's name)
    methods:
      - grpo                           # an algorithm name ...
      - gtpo
      - name: gtpo-g05                 # ... or a named variant: its algorithm and its own overrides
        algorithm: gtpo
        set: {advantages.gamma: 0.5}   # dotted keys as in `--set`, or nested sections
    seeds: [0, 1, 2]                   # each cell's RL seed: rollout.seed and update.seed (SEED_FIELDS)
    base:                              # any PipelineParams, shared by every cell
      model: smollm2
      iterations: 8
    grid:                              # optional: dotted key -> values; one grid point per combination
      update.lr: [3.0e-6, 1.0e-5]
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.algorithms import AlgorithmName

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # becomes part of run ids (flows.runstore)
# What a cell's seed sets: the RL sampling (rollout problems and samples) and the update's minibatch order. The
# data split, the warm start and the evaluation keep the base's seeds, so every cell shares them.
SEED_FIELDS: tuple[str, ...] = ("rollout.seed", "update.seed")
# Set by the study for each cell: never by the study file's base, grid or a method's overrides.
CELL_FIELDS: tuple[str, ...] = ("algorithm", "run_id", *SEED_FIELDS)


class StudyMethod(BaseModel):
    """One method of a study: an algorithm, under a name of its own, with its own parameter overrides."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN, description="The method's name in run ids, tables and plots")
    algorithm: AlgorithmName = Field(description="grpo | gtpo | murphy")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        alias="set",
        description="Parameters of this method over the base: dotted keys as in --set "
        "(advantages.gamma: 0.5) or nested sections",
    )


class StudyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Prefix of the cells' run ids (default: the study file's name)",
    )
    methods: list[StudyMethod] = Field(
        min_length=1, description="Algorithm names (grpo, gtpo, murphy) or {name, algorithm, set} variants"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Each cell's RL seed (rollout.seed and update.seed); the data, warm start and evaluation "
        "seeds stay the base's, shared by every cell",
    )
    base: dict[str, Any] = Field(default_factory=dict, description="PipelineParams shared by every cell")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted parameter key -> values: the study runs every method and seed at each combination",
    )
    concurrency: int = Field(
        1, ge=1, le=64, description="Cells run at once, each in a process of its own (1: one after another)"
    )
    allow_compute_mismatch: bool = Field(
        False,
        description="Run cells whose planned completions per iteration (or in all) differ by more than "
        "compute_tolerance (refused otherwise)",
    )
    compute_tolerance: float = Field(
        0.05, ge=0.0, le=10.0, description="Largest relative difference of planned compute between cells"
    )
    keep_optimizer_states: bool = Field(
        False,
        description="Keep every checkpoint's optimizer state (else a cell drops each superseded one as it runs, "
        "`prune_optimizer_states`, and keeps only its last one's: ~1.1 of every 1.6 GB per SmolLM2 iteration)",
    )
    prune_weights: bool = Field(
        False,
        description="When a cell completes, drop the weights of its superseded update checkpoints (`turntree prune "
        "--weights`: ~0.5 GB per SmolLM2 iteration; its evaluations and the report stay, the warm start and final "
        "policy keep theirs)",
    )
    bootstrap: int = Field(10_000, ge=0, le=1_000_000, description="Bootstrap resamples of the paired CIs")

    @field_validator("methods", mode="before")
    @classmethod
    def _names_are_algorithms(cls, v: Any) -> Any:
        """``gtpo`` stands for ``{name: gtpo, algorithm: gtpo}``."""
        if isinstance(v, list):
            return [{"name": m, "algorithm": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct and >= 0, got {v}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid {key!r} has no values")
        return v

    @model_validator(mode="after")
    def _distinct_methods(self) -> StudyParams:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be distinct, got {names}")
        return self
