"""CUDA path of the update stage (skipped without a GPU): bf16 autocast + gradient checkpointing on SmolLM2."""

from __future__ import annotations

import random

import pytest
import torch

from runtime import checkpoint as ckpt
from runtime.tableio import write_table
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES
from stages import update


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_update_of_smollm2_on_cuda(smollm2_model, tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(8):
        ids = [rng.randrange(10, 49000) for _ in range(256)]
        mask = [0] * 128 + [1] * 128
        a = 1.0 if i % 2 == 0 else -1.0
        rows.append(
            {
                "sample_id": f"s{i}",
                "source_id": f"t{i}",
                "problem_id": "p",
                "group_id": "g",
                "input_ids": ids,
                "loss_mask": mask,
                "advantages": [a * m for m in mask],
                "rollout_logprobs": [-5.0 * m for m in mask],
                "algo": "grpo",
            }
        )
    write_table(rows, SAMPLES, tmp_path / "samples.parquet")
    p = UpdateParams(
        device="cuda", dtype="bfloat16", gradient_checkpointing=True, lr=1e-5, micro_batch_size=4
    )
    out = update.run(
        p, {"samples": str(tmp_path / "samples.parquet"), "checkpoint": str(smollm2_model)}, tmp_path
    )
    m = out.metrics
    assert m["actor/tokens_per_s"] > 0 and 0 < m["actor/peak_mem_mb"] < 20_000
    assert m["actor/grad_norm"] == m["actor/grad_norm"]  # finite
    model = ckpt.load_model(out.uri("checkpoint"))
    assert next(model.parameters()).dtype == torch.float32  # fp32 master weights are what is stored
