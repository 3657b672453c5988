"""Synthetic task families, deterministic from (seed, difficulty, index), returned as PROBLEMS rows (no split).

    generate("tool-arith", count=64, seed=0, difficulty=1) -> list[dict]

- ``tool-arith`` (``stages.data.synthetic.tool_arith``): multi-step integer arithmetic to be computed with Python,
  answered as ``\\boxed{N}`` (the GTPO setting). Carries a reference program and a tool-using demonstration.
- ``func-synth`` (``stages.data.synthetic.func_synth``): "write ``def name(...)`` that …" with hidden assert tests
  (the MURPHY setting). Carries a reference solution and, in ``meta.buggy_solution``, a plausible wrong first
  attempt that fails some tests, so test feedback has something to repair.
- ``secret-tool`` / ``secret-code`` (``stages.data.synthetic.secret``): one secret digit per seed, found only through
  the reward; tasks a tiny random model learns in a few RL updates (the learning tests).

Problem i depends only on (family, seed, difficulty, i): ``generate(count=10)`` is a prefix of
``generate(count=20)``. Difficulty 1..5 scales the number of steps, the size of the numbers and the number of
hidden tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from stages.data.synthetic import func_synth, secret, tool_arith

# family -> make(rng, difficulty, index, seed) -> PROBLEMS row without split
FAMILIES: dict[str, Callable[[random.Random, int, int, int], dict]] = {
    "tool-arith": tool_arith.make_problem,
    "func-synth": func_synth.make_problem,
    "secret-tool": secret.make_tool_problem,
    "secret-code": secret.make_code_problem,
}


def generate(family: str, *, count: int, seed: int = 0, difficulty: int = 1) -> list[dict]:
    """``count`` problems of ``family``; raises ValueError on an unknown family or difficulty out of 1..5."""
    if family not in FAMILIES:
        raise ValueError(f"unknown synthetic family {family!r}; choose one of {sorted(FAMILIES)}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    make = FAMILIES[family]
    rows = []
    for i in range(count):
        rng = random.Random(f"{family}:{seed}:{difficulty}:{i}")
        rows.append(make(rng, difficulty, i, seed))
    return rows
