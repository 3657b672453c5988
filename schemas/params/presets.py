"""Named parameter sets. ``tiny_pipeline``: the smallest pipeline that exercises every stage (2 problems × 2
samples, 12-token turns, a 2-problem held-out eval) — one definition for the tests and the benchmarks."""

from __future__ import annotations

import copy
from typing import Any

TINY_PIPELINE: dict[str, Any] = {
    "iterations": 1,
    "data": {"synthetic_count": 8},
    "rollout": {
        "group_size": 2,
        "problems_per_iteration": 2,
        "max_new_tokens": 12,
        "max_turns": 2,
        "tree_depth": 2,
        "max_context_tokens": 512,
    },
    # a random model earns the same reward everywhere: keep tied groups so the update has samples
    "advantages": {"keep_zero_signal": True},
    "update": {"minibatch_size": 4, "micro_batch_size": 2},
    "eval": {"benchmark": "heldout", "max_problems": 2, "iterations": 2, "max_new_tokens": 12, "bootstrap": 20},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (neither argument is modified)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def tiny_pipeline(model: str, run_root: str, algorithm: str = "gtpo", **overrides: Any) -> dict[str, Any]:
    """The tiny pipeline's parameters as a dict (validate with ``PipelineParams.model_validate``): MURPHY on
    synthetic func-synth, the others on synthetic tool-arith; keyword overrides merge into sections."""
    source = "synthetic:func-synth" if algorithm == "murphy" else "synthetic:tool-arith"
    body = merge(TINY_PIPELINE, {"algorithm": algorithm, "model": model, "run_root": run_root})
    body["data"]["sources"] = [source]
    return merge(body, overrides)
