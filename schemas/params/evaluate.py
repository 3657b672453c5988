"""Parameters of the evaluate stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EvalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: str = Field("synthetic:func-synth", description="humaneval | mbpp | gsm8k | svamp | aime24 | amc23 | synthetic:* | path")
    data_root: str | None = Field(None, description="Directory of the benchmark files (default ../shared/data)")
    max_problems: int | None = Field(16, ge=1, description="Evaluate at most this many problems (None: all)")
    iterations: int = Field(3, ge=1, le=5, description="K: self-correction attempts (Iter-1..Iter-K)")
    samples: int = Field(1, ge=1, le=64, description="n samples per problem (pass@k)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Max tokens per attempt")
    max_turns: int = Field(3, ge=1, le=16, description="Tool turns per attempt (math)")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% CIs (0: off)")
    seed: int = Field(0, ge=0, description="Sampling and bootstrap seed")
    backend: str = Field("vllm", description="vllm | transformers")
