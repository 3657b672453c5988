"""tool-arith: multi-step integer arithmetic meant to be computed by running Python (the GTPO setting).

Each problem has ``kind="math"``, an integer ``answer``, a ``reference_solution`` (one program printing the
answer) and a ``demonstration``: the reference tool-using transcript in the rollout layout of
``maths.prompts`` (``demonstration_transcript`` splits it), one or more steps of

    <one reasoning line>\\n```python\\n<self-contained code that prints one number>\\n```\\n
    ```output\\n<exactly what the code prints>\\n```\\n

followed by ``The answer is \\boxed{N}.`` Each code block repeats the numbers it needs (no state is assumed
to persist between blocks). Templates are a registry; difficulty 1..5 scales the number of operations and
the size of the numbers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Step:
    reasoning: str
    code: str  # prints exactly one integer


@dataclass(frozen=True)
class Task:
    template: str
    prompt: str
    steps: tuple[Step, ...]
    answer: int


def _run(code: str) -> int:
    """Value printed by our own generated one-line-print code (trusted: built from integers here)."""
    expr = code.strip().removeprefix("print(").removesuffix(")")
    return int(eval(expr, {"__builtins__": {}, "sum": sum, "range": range, "pow": pow}))  # noqa: S307


def _big(rng: random.Random, d: int) -> int:
    return rng.randint(10 ** (1 + d // 2), 10 ** (2 + d // 2) - 1)


def _expression(rng: random.Random, d: int) -> Task:
    expr = str(_big(rng, d))
    for _ in range(d + 1):
        op, n = rng.choice(OPS), rng.randint(2, 10 ** (1 + d // 2))
        expr = f"({expr} {op} {n})" if rng.random() < 0.5 else f"({n} {op} {expr})"
    expr = expr[1:-1]
    code = f"print({expr})"
    return Task(
        "expression",
        f"Compute the value of {expr}.",
        (Step("Let me evaluate the expression.", code),),
        _run(code),
    )


def _boxes(rng: random.Random, d: int) -> Task:
    crates, per = _big(rng, d), rng.randint(6, 24 + 10 * d)
    broken = rng.randint(1, crates)
    box = rng.randint(7, 12 + 5 * d)
    bottles = crates * per - broken
    prompt = (
        f"A warehouse holds {crates} crates with {per} bottles in each crate. {broken} bottles are broken and "
        f"thrown away. The remaining bottles are packed into boxes of {box}. How many boxes can be filled completely?"
    )
    steps = (
        Step("First, count the bottles that are not broken.", f"print({crates} * {per} - {broken})"),
        Step("Now count the full boxes.", f"print({bottles} // {box})"),
    )
    return Task("boxes", prompt, steps, bottles // box)


def _sum_squares(rng: random.Random, d: int) -> Task:
    lo = rng.randint(1, 10 * d)
    hi = lo + rng.randint(5, 20 * d * d)
    code = f"print(sum(i * i for i in range({lo}, {hi + 1})))"
    prompt = f"What is the sum of the squares of all integers from {lo} to {hi}, inclusive?"
    return Task("sum_squares", prompt, (Step("Let me add up the squares with a loop.", code),), _run(code))


def _power_mod(rng: random.Random, d: int) -> Task:
    base, exp, mod = (
        rng.randint(2, 30 + 10 * d),
        rng.randint(5, 10 + 20 * d),
        rng.randint(7, 10 ** (1 + d // 2) + 7),
    )
    code = f"print(pow({base}, {exp}, {mod}))"
    prompt = f"What is the remainder when {base}^{exp} is divided by {mod}?"
    return Task("power_mod", prompt, (Step("Let me compute the modular power.", code),), _run(code))


def _savings(rng: random.Random, d: int) -> Task:
    start, weekly, weeks = _big(rng, d), rng.randint(5, 40 * d), rng.randint(3, 10 + 5 * d)
    spend = rng.randint(1, start // 2 + 1)
    total = start + weekly * weeks
    prompt = (
        f"Maya has {start} dollars. She saves {weekly} dollars every week for {weeks} weeks, then spends "
        f"{spend} dollars on a bike. How many dollars does she have left?"
    )
    steps = (
        Step("First, find how much she has after saving.", f"print({start} + {weekly} * {weeks})"),
        Step("Then subtract the price of the bike.", f"print({total} - {spend})"),
    )
    return Task("savings", prompt, steps, total - spend)


TEMPLATES: dict[str, Callable[[random.Random, int], Task]] = {
    "expression": _expression,
    "boxes": _boxes,
    "sum_squares": _sum_squares,
    "power_mod": _power_mod,
    "savings": _savings,
}


def demonstration(task: Task) -> str:
    """The reference transcript (layout in the module docstring)."""
    parts = []
    for step in task.steps:
        parts.append(f"{step.reasoning}\n```python\n{step.code}\n```\n```output\n{_run(step.code)}\n```\n")
    parts.append(f"The answer is \\boxed{{{task.answer}}}.")
    return "".join(parts)


def reference_program(task: Task) -> str:
    """One program printing the answer (the last step's code; earlier steps' values are literals in it)."""
    return task.steps[-1].code + "\n"


def make_problem(rng: random.Random, difficulty: int, index: int, seed: int) -> dict:
    name = rng.choice(sorted(TEMPLATES))
    task = TEMPLATES[name](rng, difficulty)
    return {
        "problem_id": f"tool-arith/d{difficulty}/s{seed}/{index}",
        "source": "synthetic:tool-arith",
        "kind": "math",
        "prompt": task.prompt,
        "entry_point": None,
        "tests": None,
        "test_format": "none",
        "answer": str(task.answer),
        "reference_solution": reference_program(task),
        "demonstration": demonstration(task),
        "difficulty": str(difficulty),
        "meta": f'{{"template": "{name}", "steps": {len(task.steps)}}}',
    }
