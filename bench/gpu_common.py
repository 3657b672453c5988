"""What the GPU check's sections share (``bench/gpu_check.py`` runs them): the model shapes and the GPU / CPU-smoke
configurations, progress notes, random checkpoints and RL-shaped samples, and the FLOP model."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, datasheet (SXM)

# --- model shapes -------------------------------------------------------------------------------------------------
SMOLLM2 = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct's shape (random weights)
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip
LLAMA_1B = dict(  # Llama-3.2-1B's body with SmolLM2's vocabulary: 1.07B parameters
    vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip
TOY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024,
)  # fmt: skip

GPU_CONFIG = {
    "device": "cuda",
    "budget_s": 330,
    "s1": {
        "timeout_s": 120,
        "gemm_n": 8192,
        "shapes": {
            "smollm2-135m": {"arch": SMOLLM2, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                             "minibatch": 64, "micro": 16, "reps": 2},
            "llama-1.07b": {"arch": LLAMA_1B, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                            "minibatch": 64, "micro": 8, "reps": 2},
            # the same model and samples with gradient checkpointing (what tests/test_update_gpu.py runs), twice
            # the micro-batch: the memory it saves and the recompute it costs (last: a timeout loses only this)
            "llama-1.07b-gc": {"arch": LLAMA_1B, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                               "minibatch": 64, "micro": 16, "reps": 1, "gc": True, "no_baseline": True},
        },
        "baseline_len": 1536,
    },
    "s2": {"timeout_s": 100, "arch": SMOLLM2, "samples": 16, "len": [512, 1024], "prompt": [64, 256],
           "minibatch": 8, "micro": 4, "lr": 1e-4},
    "s3": {
        "timeout_min_s": 60, "timeout_max_s": 150,
        "model": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                  "num_key_value_heads": 2},
        "data": {"synthetic_count": 3000, "synthetic_difficulty": 1, "eval_fraction": 0.02},
        "warmstart": {"steps": 400, "batch_size": 32, "micro_batch_size": 32, "lr": 2e-3, "warmup_steps": 20},
        "rollout": {"group_size": 8, "problems_per_iteration": 4, "max_new_tokens": 64, "max_turns": 2},
        "update": {"lr": 1e-4, "minibatch_size": 32, "micro_batch_size": 32},
        "eval": {"max_problems": 16, "max_new_tokens": 64, "max_turns": 2, "bootstrap": 200},
        "iterations": 4,
        "seed_bench": {"prompts": 8, "max_tokens": 48},
    },
}  # fmt: skip

CPU_CONFIG = {
    "device": "cpu",
    "budget_s": 1500,
    "s1": {
        "timeout_s": 300,
        "gemm_n": 256,
        "shapes": {
            "toy": {"arch": TOY, "samples": 8, "len": [48, 96], "prompt": [8, 24], "minibatch": 4, "micro": 2,
                    "reps": 1},
            "toy-gc": {"arch": TOY, "samples": 8, "len": [48, 96], "prompt": [8, 24], "minibatch": 4, "micro": 4,
                       "reps": 1, "gc": True, "no_baseline": True},
        },
        "baseline_len": 64,
    },
    "s2": {"timeout_s": 400, "arch": TOY, "samples": 6, "len": [32, 64], "prompt": [8, 16], "minibatch": 4,
           "micro": 2, "lr": 1e-3},
    "s3": {
        "timeout_min_s": 60, "timeout_max_s": 700,
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "data": {"synthetic_count": 40, "synthetic_difficulty": 1, "eval_fraction": 0.2},
        "warmstart": {"steps": 80, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 0},
        "rollout": {"group_size": 2, "problems_per_iteration": 2, "max_new_tokens": 48, "max_turns": 2},
        "advantages": {"keep_zero_signal": True},  # the smoke's toy policy rarely earns a reward: train anyway
        "update": {"lr": 1e-4, "minibatch_size": 4, "micro_batch_size": 4},
        "eval": {"max_problems": 4, "max_new_tokens": 48, "max_turns": 2, "bootstrap": 50},
        "iterations": 2,
        "seed_bench": {"prompts": 3, "max_tokens": 8},
    },
}  # fmt: skip

SECTIONS = ("s1", "s2", "s3")


# --- small helpers ------------------------------------------------------------------------------------------------
T0 = time.perf_counter()


def note(msg: str) -> None:
    """A progress line in the section's log (gpu_check.log)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def build_checkpoint(out: Path, arch: dict, device: str, *, seed: int = 0) -> Path:
    """A randomly initialised Llama of shape ``arch`` saved in bf16 (the update loads fp32 master weights from
    it) with a stub tokenizer file (the update never tokenises; ``check_checkpoint`` wants one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**arch, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": arch["max_position_embeddings"]})
    )
    del model
    free(device)
    return out


def sample_rows(
    n: int, vocab: int, lens: list[int], prompts: list[int], seed: int, group: int = 8
) -> list[dict]:
    """Samples-table rows shaped like RL samples: a prompt shared by each group of ``group`` (untrained), a
    completion (trained) with an untrained tool-output span inside, ±1 advantages, rollout log-probs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % group == 0:
            prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(*prompts))]
        length = max(rng.randint(*lens), len(prompt) + 8)
        ids = prompt + [rng.randrange(10, vocab) for _ in range(length - len(prompt))]
        mask = [0] * len(prompt) + [1] * (length - len(prompt))
        g0 = len(prompt) + (length - len(prompt)) // 3
        gap = rng.randint(0, max(0, (length - len(prompt)) // 8))
        for t in range(g0, min(g0 + gap, length - 1)):
            mask[t] = 0
        a = 1.0 if (i // 2) % 2 == 0 else -1.0
        rows.append(
            {
                "sample_id": f"s{seed}-{i}",
                "source_id": f"t{seed}-{i}",
                "problem_id": f"p{seed}-{i // group}",
                "group_id": f"g{seed}-{i // group}",
                "input_ids": ids,
                "loss_mask": mask,
                "advantages": [a * m for m in mask],
                "rollout_logprobs": [-3.0 * m for m in mask],
                "algo": "grpo",
            }
        )
    return rows


def write_samples(path: Path, rows: list[dict]) -> str:
    from runtime.tableio import write_table
    from schemas.tables import SAMPLES

    write_table(rows, SAMPLES, path)
    return str(path)


def flop_model(cfg) -> dict:
    """Per-token parameter counts for the FLOP formula (module docstring)."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    body = n_layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    return {"n_body": body, "n_head": cfg.vocab_size * h, "n_layers": n_layers, "hidden": h}


def train_flops(fm: dict, length: int, prompt: int) -> float:
    kept = max(length - prompt + 1, 1)
    return (
        6.0 * fm["n_body"] * length
        + 6.0 * fm["n_head"] * kept
        + 6.0 * fm["n_layers"] * fm["hidden"] * length**2
    )


# --- s1: update throughput ------------------------------------------------------------------------------------------
