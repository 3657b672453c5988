"""Parameters of the evaluate stage (see docs/algorithms.md, "Evaluation")."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.benchmarks import sources_help


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: str = Field(
        "synthetic:func-synth",
        description="heldout (the run's held-out problems) | " + sources_help() + "; a named benchmark "
        "evaluates its test split",
    )
    data_root: str | None = Field(
        None,
        description="Directory of the benchmark files, same layout as stages/data/benchmarks (default: "
        "$TURNTREE_SHARED_DATA if set, else the files shipped with turntree)",
    )
    split: Literal["eval", "train", "all"] = Field(
        "eval", description="Rows of a given problems table to evaluate (a named benchmark is used whole)"
    )
    max_problems: int | None = Field(16, ge=1, description="Evaluate at most this many problems (None: all)")
    iterations: int = Field(3, ge=1, le=5, description="K: self-correction attempts (Iter-1..Iter-K)")
    samples: int = Field(1, ge=1, le=64, description="n samples per problem (unbiased pass@k when n > 1)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Max tokens per attempt (per turn for math)")
    max_turns: int = Field(3, ge=1, le=16, description="Tool turns per attempt (math, TIR)")
    test_timeout_s: float = Field(10.0, gt=0, le=300, description="Sandbox limit per test run")
    feedback_max_chars: int = Field(1500, ge=64, le=20_000, description="Feedback text kept between attempts")
    bootstrap: int = Field(1000, ge=0, le=100_000, description="Bootstrap resamples for 95% CIs (0: off)")
    seed: int = Field(0, ge=0, description="Sampling and bootstrap seed")
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="Generation backend (when no live engine)"
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="vLLM KV-cache size on CPU (GiB), when an engine is built"
    )

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalParams:
        if self.samples > 1 and self.temperature == 0.0:
            raise ValueError(
                f"samples={self.samples} with temperature 0 (greedy) would draw {self.samples} identical samples; "
                "set temperature > 0 (e.g. 0.8) for pass@k, or samples=1"
            )
        return self
