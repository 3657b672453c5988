"""Response-length and truncation statistics of a rollout (the RL health view's lengths): how long the model's
turns are, and how often a turn was cut by its token limit or a trajectory by the context window.

    length_metrics(rows, kind, max_new_tokens) -> {"rollout/response_tokens_mean": …, …}

- ``rollout/response_tokens_mean`` / ``_max``: generated tokens per turn (TIR) or per node (tree);
- ``rollout/trajectory_tokens_mean``: generated tokens per trajectory (TIR) or per tree;
- ``rollout/truncated_turn_frac``: turns / nodes whose completion reached ``max_new_tokens`` (cut mid-answer);
- ``rollout/stop_<reason>_frac`` (TIR): trajectories by stop reason (answer, max_turns, max_tokens,
  context_limit, error), each fraction of the trajectories.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STOP_REASONS = ("answer", "max_turns", "max_tokens", "context_limit", "error")


def length_metrics(rows: list[dict[str, Any]], kind: str, max_new_tokens: int) -> dict[str, float]:
    units = "turns" if kind == "trajectories" else "nodes"
    per_unit = [len(u["completion_token_ids"]) for r in rows for u in r[units]]
    per_row = [sum(len(u["completion_token_ids"]) for u in r[units]) for r in rows]
    if not per_unit:
        return {}
    out = {
        "rollout/response_tokens_mean": sum(per_unit) / len(per_unit),
        "rollout/response_tokens_max": float(max(per_unit)),
        "rollout/trajectory_tokens_mean": sum(per_row) / len(per_row),
        "rollout/truncated_turn_frac": sum(n >= max_new_tokens for n in per_unit) / len(per_unit),
    }
    if kind == "trajectories":
        stops = Counter(r["stop_reason"] for r in rows)
        for reason in sorted({*STOP_REASONS, *stops}):
            out[f"rollout/stop_{reason}_frac"] = stops.get(reason, 0) / len(rows)
    return out
