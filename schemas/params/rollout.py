"""Parameters of the rollout stage (engine, TIR trajectories, MURPHY trees)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.algorithms import RolloutKind


class RolloutParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: RolloutKind = Field(
        "trajectories",
        description="trajectories: multi-turn tool use (GRPO/GTPO); trees: MURPHY feedback trees "
        "(set by the pipeline's algorithm)",
    )
    backend: Literal["vllm", "transformers"] = Field("vllm", description="Generation backend")
    group_size: int = Field(4, ge=1, le=64, description="G: samples per problem (roots per tree)")
    child_group_size: int | None = Field(
        None, ge=1, le=64, description="G': children per failed node (None: G)"
    )
    max_turns: int = Field(3, ge=1, le=16, description="Turn limit of a TIR trajectory")
    tree_depth: int = Field(2, ge=1, le=5, description="S: depth limit of a MURPHY tree")
    max_nodes_per_tree: int = Field(64, ge=1, description="Node budget per tree")
    max_nodes_per_batch: int = Field(4096, ge=1, description="Node budget per rollout batch")
    problems_per_iteration: int = Field(
        8, ge=1, description="Problems sampled from the train split per iteration"
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="Max tokens per turn")
    max_context_tokens: int = Field(2048, ge=64, description="Context limit of a trajectory")
    observation_max_chars: int = Field(1500, ge=64, description="Execution output kept per observation")
    exec_timeout_s: float = Field(5.0, gt=0, le=120, description="Sandbox wall-clock limit per tool call")
    seed: int = Field(0, ge=0, description="Sampling seed")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV-cache size on CPU (GiB)")
    prefix_caching: bool = Field(True, description="vLLM automatic prefix caching")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The rollout engine's weights and KV cache: auto = float32 on CPU (log-probs that match the "
        "update's fp32 model to ~1e-5), the model's own on CUDA; bfloat16 on a CPU with native bf16 matmuls "
        "generates ~1.5x faster (bench: 943 vs 641 tokens/s), the pushed fp32 weights rounded to bf16. "
        "Evaluation in the same process reuses the live engine, so it then samples in bf16 too",
    )
    stop_after_code: bool = Field(
        True, description="tree mode: end an attempt at the end of its first closed code block (saves tokens)"
    )
    # --- scale-out (stages/rollout/fanout.py, docs: infra/README.md "Ray") ---
    workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="Engine actors on a Ray cluster, each rolling out a shard of the problems (1: in this "
        "process, no Ray)",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster of the workers: None: RAY_ADDRESS, else a new local cluster sized to this "
        "machine; 'auto', 'host:port' or 'ray://host:port': an existing one",
    )
    worker_cpus: float = Field(1.0, gt=0, description="Ray CPUs reserved per engine actor")
    worker_gpus: float = Field(
        0.0, ge=0, description="Ray GPUs reserved per engine actor (tensor x data parallel size on GPUs)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM tensor parallelism of each engine")
    data_parallel_size: int = Field(1, ge=1, le=64, description="vLLM data parallelism of each engine")
    seeding: Literal["batch", "request"] | None = Field(
        None,
        description="batch: a request's sampling seed also depends on its place in the generate batch; "
        "request: only on (seed, iteration, the request's tokens, its rank among identical requests), so "
        "any split of the problems over workers samples the same; None: request when workers > 1, else batch",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_mode(cls, v):
        """Configs and run manifests written before ``kind`` said ``mode: tir|tree``."""
        if isinstance(v, dict) and "mode" in v and "kind" not in v:
            legacy = {"tir": "trajectories", "tree": "trees"}
            if v["mode"] not in legacy:
                raise ValueError(f"rollout.mode {v['mode']!r}: valid: tir, tree (now rollout.kind)")
            v = {**{k: x for k, x in v.items() if k != "mode"}, "kind": legacy[v["mode"]]}
        return v

    @model_validator(mode="after")
    def _scale_out(self):
        if self.workers > 1 and self.seeding == "batch":
            raise ValueError(
                "rollout.seeding 'batch' cannot be split over workers > 1 (a shard's batch positions differ): "
                "use seeding 'request' or leave it unset"
            )
        if self.backend != "vllm" and (self.tensor_parallel_size > 1 or self.data_parallel_size > 1):
            raise ValueError("rollout.tensor_parallel_size / data_parallel_size > 1 need backend 'vllm'")
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("rollout.ray_address is empty: leave it unset (null) or give 'auto' / host:port")
        return self

    @property
    def request_seeding(self) -> bool:
        """Whether each request's seed is keyed by its content (see ``seeding``)."""
        return (self.seeding or ("request" if self.workers > 1 else "batch")) == "request"
