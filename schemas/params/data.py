"""Parameters of the data stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.benchmarks import sources_help


class DataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(
        default_factory=lambda: ["synthetic:tool-arith"],
        min_length=1,
        description=sources_help() + " (paths: .jsonl/.jsonl.gz/.json/.parquet; hf:<name>:<config>:<split> too)",
    )
    format: Literal["auto", "humaneval", "mbpp", "gsm8k", "math", "problems"] = Field(
        "auto", description="Record format of path/hub sources; auto detects it from the fields"
    )
    skip_bad: bool = Field(False, description="Skip (and count) malformed records instead of failing")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of problems held out for eval")
    seed: int = Field(0, ge=0, description="Seed of the train/eval split and of synthetic generators")
    synthetic_count: int = Field(64, ge=1, le=100_000, description="Problems per synthetic family")
    synthetic_difficulty: int = Field(1, ge=1, le=5, description="Difficulty knob of synthetic families")
    max_problems: int | None = Field(None, ge=1, description="Keep at most this many problems (after dedup)")
