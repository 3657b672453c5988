"""Parameters of the score and advantages stages (see docs/algorithms.md).

Choices the papers leave open are parameters here, with the spec's default, and logged by each run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RewardName = Literal["tests_fraction", "tests_all_pass", "math_answer", "math_answer_lenient", "format"]


class ScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code_reward: Literal["fraction", "binary"] = Field(
        "fraction", description="Code outcome and MURPHY node reward r(n): tests fraction or all-pass"
    )
    reward_weights: dict[RewardName, float] | None = Field(
        None,
        description="Outcome reward r_i = Σ weight · component over registered reward functions that apply to "
        "a row (maths.reward_fns.REWARDS); None: the code component picked by code_reward, and math_answer, weight 1",
    )
    math_rel_tol: float = Field(
        1e-6, ge=0.0, le=0.1, description="Relative tolerance of numeric answer equality"
    )
    format_penalty: float = Field(-0.1, le=0.0, description="GTPO penalty per invalid / missing tool call")
    stack_penalties: bool = Field(False, description="(open) allow more than one penalty per turn")
    format_gate: bool = Field(
        True,
        description="GRPO baseline: the trajectory outcome reward r_i is 0 when any turn made an invalid tool call",
    )
    shaping: bool = Field(True, description="GTPO self-supervised shaping of failed trajectories")
    step_reward: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="GTPO turn reward for a verified intermediate step: a turn whose tool call ran and printed "
        "a value that an earlier step of the problem's reference transcript printed (maths.step_rewards; "
        "multi-step tool-arith), once per value and trajectory; the outcome r_i is untouched. 0: off",
    )
    shaping_alpha: float = Field(0.5, ge=0.0, lt=1.0, description="α: shaped reward scale, < 1")
    similarity: Literal["lexical", "embedding"] = Field(
        "lexical", description="(open) similarity registry entry used by shaping: lexical | embedding"
    )
    embedding_model: str | None = Field(
        None, description="Local encoder directory for similarity 'embedding' (nothing is downloaded)"
    )
    test_timeout_s: float = Field(10.0, gt=0, le=300, description="Sandbox limit per test run")
    sandbox_ray: bool = Field(
        False,
        description="Run the test batches as Ray tasks (each through its node's sandbox) on the cluster this "
        "process is connected to, else RAY_ADDRESS's, else a new local one",
    )


class AdvantageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: Literal["grpo", "dr_grpo", "gtpo", "murphy"] = Field("grpo", description="Advantage estimator")
    gamma: float = Field(0.9, ge=0.0, le=1.0, description="(open) GTPO turn discount γ")
    norm_scope: Literal[
        "end_aligned", "end_aligned_discounted", "absorbing", "turn_position", "group", "batch"
    ] = Field(
        "end_aligned",
        description="(open) GTPO normalisation set. end_aligned: per number of turns left, every trajectory of "
        "the group present; unlike group it gives successes no negative turns (maths.estimators.NORM_SCOPES). "
        "end_aligned_discounted: the same sets, one scale per group, so γ acts (outcome-only: γ^d × GRPO's)",
    )
    murphy_mode: Literal["max", "mean"] = Field(
        "max", description="MaRS (max) or MeRS (mean, bounded: R = r + (1 − r) · γ_m · mean child R)"
    )
    murphy_gamma: float = Field(1.0, ge=0.0, le=1.0, description="(open) γ_m discounting child returns")
    inter_keep: int | None = Field(None, ge=1, description="(open) InterP: sibling groups kept (None: all)")
    intra_keep: int | None = Field(None, ge=2, description="(open) IntraP: nodes kept per group (None: all)")
    keep_zero_signal: bool = Field(False, description="Keep groups whose rewards all tie (no signal)")
    signal_from: Literal["advantages", "outcomes"] = Field(
        "advantages",
        description="Which trajectory groups have a signal to train on. advantages: any non-zero advantage "
        "(GTPO's format penalties and shaping count, so a group where no answer is right can still train); "
        "outcomes: only groups whose outcome rewards r_i differ, as GRPO (the two agree for GRPO/Dr.GRPO). "
        "MURPHY's sibling sets are judged by their returns either way",
    )
    eps: float = Field(1e-6, gt=0, description="ε in the z-score")
