"""Parameters of the update and warm-start stages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class UpdateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-6, gt=0, le=1e-2, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup of the learning rate (optimizer steps)")
    ppo_epochs: int = Field(1, ge=1, le=16, description="Passes over the samples per update")
    minibatch_size: int = Field(8, ge=1, description="Sequences per optimizer step")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass (gradient accumulation)")
    clip_eps_low: float = Field(0.2, ge=0.0, le=1.0, description="ε_low")
    clip_eps_high: float = Field(0.2, ge=0.0, le=1.0, description="ε_high (0.28 = DAPO clip-higher)")
    kl_beta: float = Field(0.0, ge=0.0, description="β of the k3 KL to the reference model (0: no reference)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="Loss aggregation"
    )
    tis_cap: float | None = Field(None, gt=0, description="Truncated importance sampling cap C (None: off)")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the update runs")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: fp32 on CPU, bf16 on CUDA")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (CUDA)")
    lora_rank: int | None = Field(None, ge=1, description="LoRA rank via peft (None: full fine-tune)")
    seed: int = Field(0, ge=0, description="Seed of the minibatch order")


class WarmstartParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Run a supervised warm start before iteration 1")
    steps: int = Field(20, ge=1, description="Optimizer steps")
    lr: float = Field(5e-5, gt=0, le=1e-2, description="Learning rate")
    batch_size: int = Field(8, ge=1, description="Demonstrations per step")
    seed: int = Field(0, ge=0, description="Shuffle seed")
