"""Verified intermediate steps: a turn-level reward for multi-step tool use (issue 22 item 3b).

A problem whose reference transcript (``demonstration``: steps of code and the ``output`` each printed) takes
more than one step has intermediate values — what each step before the last printed (tool-arith's two-step
"savings": the balance before the purchase). A rollout turn whose tool call ran (``exec_status`` "ok") and
whose output shows one of those values has computed a step of the solution, whatever happens later; the score
stage adds ``ScoreParams.step_reward`` to that turn's GTPO turn reward r_ij, once per value and trajectory.
The outcome reward r_i (GRPO's) is untouched: only turn-level credit sees it.

An output that shows more than ``MAX_NUMBERS`` numbers earns nothing: printing ranges of numbers to hit a
value by chance is not computing it.

    reference_steps(demonstration) -> ["1234", …]        the values before the last step's
    step_rewards(steps, outputs, statuses, lengths, bonus) -> (M,) per-turn bonus
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

MAX_NUMBERS = 4  # a turn's output with more numbers than this earns no step reward
_OUTPUT_BLOCK = re.compile(r"```output\n(.*?)\n?```", re.S)
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def reference_steps(demonstration: str | None) -> list[float]:
    """The numbers printed by every step of a reference transcript except the last (its answer)."""
    outputs = _OUTPUT_BLOCK.findall(demonstration or "")
    values = []
    for text in outputs[:-1]:
        found = _NUMBER.findall(text)
        if len(found) == 1:
            values.append(float(found[0]))
    return values


def _shown(output: str | None) -> list[float]:
    found = _NUMBER.findall(output or "")
    return [] if len(found) > MAX_NUMBERS else [float(x) for x in found]


def step_rewards(
    steps: Sequence[Sequence[float]],
    outputs: Sequence[str | None],
    statuses: Sequence[str],
    lengths: np.ndarray,
    bonus: float,
) -> np.ndarray:
    """(M,) the step bonus of each turn of N trajectories (``lengths`` (N,) turns each; ``outputs``,
    ``statuses`` (M,) per turn; ``steps`` (N,) each trajectory's reference intermediate values)."""
    out = np.zeros(int(np.sum(lengths)), np.float64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for i, wanted in enumerate(steps):
        left = list(wanted)
        for m in range(offsets[i], offsets[i + 1]):
            if not left or statuses[m] != "ok":
                continue
            shown = _shown(outputs[m])
            hit = [v for v in left if any(abs(v - s) <= 1e-9 * max(1.0, abs(v)) for s in shown)]
            for v in hit:
                left.remove(v)
            out[m] += bonus * len(hit)
    return out
