"""Parameters of the update and warm-start stages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names registered in maths.policy_loss (a test checks the two stay equal).
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PolicyLossName = Literal["ppo-clip"]
KLEstimator = Literal["k1", "k2", "k3"]


class UpdateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-6, gt=0, le=1e-2, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (β1, β2)")
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup of the learning rate (optimizer steps, global)"
    )
    ppo_epochs: int = Field(1, ge=1, le=16, description="Passes over the samples per update")
    minibatch_size: int = Field(8, ge=1, description="Sequences per optimizer step")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass (gradient accumulation)")
    policy_loss: PolicyLossName = Field("ppo-clip", description="Policy loss (maths.policy_loss registry)")
    clip_eps_low: float = Field(0.2, ge=0.0, le=1.0, description="ε_low")
    clip_eps_high: float = Field(0.2, ge=0.0, le=1.0, description="ε_high (0.28 = DAPO clip-higher)")
    kl_beta: float = Field(
        0.0, ge=0.0, description="β of the KL to the reference model (0: no reference model is loaded)"
    )
    kl_estimator: KLEstimator = Field("k3", description="KL_t estimator; k3 = π_ref/π_θ − log(π_ref/π_θ) − 1")
    loss_agg: LossAgg = Field("token-mean", description="Loss aggregation over the tokens of a minibatch")
    loss_norm_tokens: int = Field(
        2048,
        ge=1,
        description="Constant divisor of seq-mean-token-sum-norm (Dr.GRPO); set it to the rollout context limit",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling cap C on π_old/π_rollout (None: off; 2 is usual)",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        le=8,
        description="Samples whose rollout policy is more than this many updates behind the trained one are "
        "dropped (set from the pipeline's max_staleness; 0: synchronous, every sample is on-policy)",
    )
    stale_is_cap: float = Field(
        2.0,
        gt=0,
        description="Stale samples (policy_version behind the trained checkpoint) are weighted by the truncated "
        "importance ratio min(π_prox/π_behav, cap): π_prox the policy before this update (log π_old, recomputed), "
        "π_behav the rollout's (decoupled PPO, docs/algorithms.md); on-policy samples keep weight 1",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (total L2 norm)")
    target_kl: float | None = Field(
        0.1,
        gt=0,
        description="Early stop: when a minibatch's KL(π_old || π_θ) (k3, token mean, measured in its forward pass) "
        "exceeds this, its optimizer step and all later ones of the update are skipped (None: never stop)",
    )
    old_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="log π_old: recompute (the policy before the update; the first minibatch takes it from its own "
        "forward pass, the others from one no-grad pass) or rollout (the engine's log-probs stand in: no extra pass)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the update runs (auto: cuda if any)"
    )
    cpu_threads: int = Field(
        1,
        ge=0,
        le=1024,
        description="CPU update: torch threads (0: every core this process may use). When the process's thread "
        "count cannot be raised (vLLM pinned it), the update runs in a subprocess with this many. Default 1: "
        "checkpoint bits then do not depend on the machine's core count, and a gain from more threads beside a "
        "live vLLM engine on 2 cores was not shown (bench/bench_update.py measures it)",
    )
    shared_prefix: bool = Field(
        False,
        description="Micro-batches by prompt, and the tokens a micro-batch's samples share at their start (a GRPO "
        "group's prompt, a MURPHY node's ancestry) run through the model once (packed as a prefix trie under a "
        "tree mask, or a KV cache repeated per sample; the same loss and gradient to float rounding, fewer "
        "positions: stages.update.prefix). One process only; ignored under nproc/nnodes > 1",
    )
    minibatch_by: Literal["sample", "problem"] = Field(
        "sample",
        description="How an epoch is shuffled into minibatches: by sample, or by problem (a GRPO group's or a "
        "MURPHY tree's samples stay together, so that shared_prefix finds their shared prompt and ancestry in "
        "one micro-batch; fewer problems per optimizer step when a minibatch is smaller than the batch)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype (bf16 = autocast over fp32 master weights); auto: bf16 on CUDA and on a CPU "
        "with native bf16 matmuls (avx512_bf16 / amx_bf16: ~4x its fp32 GEMM), else fp32",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass")
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank via peft (None: full fine-tune)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA α (scale α/r)")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters",
    )
    save_optimizer_state: bool = Field(
        True, description="Store optimizer/scheduler/RNG state in the checkpoint (needed for exact resume)"
    )
    seed: int = Field(
        0, ge=0, description="Seed of the minibatch order (order = f(seed, update index, epoch))"
    )
    nproc: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes (one GPU each on CUDA): > 1 runs the update under torchrun --nproc-per-node",
    )
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="How nproc > 1 processes share the model: DDP replicas, or FSDP2 (fully_shard) shards",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=256,
        description="Nodes (machines) of the update, nproc processes each: > 1 runs torchrun with a c10d "
        "rendezvous at rdzv_endpoint instead of --standalone; every node runs the stage with its own node_rank",
    )
    node_rank: int = Field(
        0,
        ge=0,
        description="This node's rank (0 .. nnodes-1); node 0 hosts the rendezvous and writes the checkpoint",
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$",
        description="host:port of the c10d rendezvous, reachable from every node (node 0 listens there); "
        "needed when nnodes > 1",
    )
    rdzv_id: str = Field(
        "turntree-update",
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Rendezvous id: the same on every node of one update, different for concurrent updates",
    )

    @model_validator(mode="after")
    def _micro_fits_minibatch(self) -> UpdateParams:
        if self.micro_batch_size > self.minibatch_size:
            self.micro_batch_size = self.minibatch_size
        return self

    @model_validator(mode="after")
    def _lora_not_sharded(self) -> UpdateParams:
        if self.lora_rank and self.nproc * self.nnodes > 1 and self.distributed == "fsdp2":
            raise ValueError("LoRA with distributed='fsdp2' is not supported: use distributed='ddp'")
        return self

    @model_validator(mode="after")
    def _nodes(self) -> UpdateParams:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} is not below nnodes={self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (host:port of node 0's rendezvous)")
        return self

    @property
    def world_size(self) -> int:
        """Processes in the whole update (all nodes)."""
        return self.nnodes * self.nproc


class WarmstartParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run a supervised warm start before iteration 1")
    cache: bool = Field(
        True,
        description="Reuse a warm start made earlier from the same model, problems and parameters "
        "($TURNTREE_CACHE/warmstart, default ~/.cache/turntree)",
    )
    steps: int = Field(20, ge=1, description="Optimizer steps")
    lr: float = Field(5e-5, gt=0, le=1e-2, description="Learning rate")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup of the learning rate (optimizer steps)")
    batch_size: int = Field(8, ge=1, description="Demonstrations per step")
    micro_batch_size: int = Field(4, ge=1, description="Demonstrations per forward pass")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (total L2 norm)")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many demonstrations")
    split: Literal["train", "eval", "any"] = Field(
        "train", description="Problems split to take demonstrations from"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the fine-tune runs")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on CUDA and on a CPU with native bf16 matmuls, else fp32"
    )
    seed: int = Field(0, ge=0, description="Shuffle seed")
