"""secret-tool / secret-code: tasks a tiny random model learns in seconds, for learning tests of the RL loop.

Every problem of a seed has the same answer, the seed's *secret* digit, which nothing in the prompt reveals:
a policy finds it only by being rewarded for it. What the policy has to learn is therefore a couple of token
choices, not a skill, so a few RL updates on a tiny model move the reward measurably.

- ``secret-tool`` (``kind="math"``, the GRPO / GTPO setting): "run Python, then answer". The demonstration
  makes one tool call and answers ``\\boxed{secret}``. Scored with ``SECRET_TOOL_SCORE`` (a format
  violation, i.e. no tool call in the first turn or an invalid call, costs 1), a trajectory earns 1 only when
  it makes the tool call *and* boxes the secret; answering right without the tool earns 0. So a regression
  that pushes the policy away from the tool-call turn of successful trajectories lowers the reward.
- ``secret-code`` (``kind="code"``, the MURPHY setting): "write ``def secret()``"; one hidden test
  ``assert secret() == <secret>``, so a wrong first attempt gets "expected vs got" feedback a repair can use.

``noisy_demonstration(problem, tool, right)`` gives the four variants (tool call or not, right digit or
``wrong_digit``): a warm start on a mixture of them yields a policy that is right part of the time, which RL
then has to improve; a warm start on the reference demonstrations yields one that already solves the task.
Difficulty is recorded and changes nothing.
"""

from __future__ import annotations

import json
import random

# Outcome reward r_i = math_answer + format, with a penalty of 1 per format violation (score-stage parameters).
SECRET_TOOL_SCORE = {"format_penalty": -1.0, "reward_weights": {"math_answer": 1.0, "format": 1.0}}

TOOL_CODE = "print('opened')"  # what the demonstrated tool call runs (prints "opened")
_SUBJECTS = ("vault", "locker", "safe", "drawer", "box", "door", "chest", "case")


def secret_digit(seed: int) -> int:
    """The answer of every problem of ``seed`` (7 for seed 0)."""
    return (7 + 3 * seed) % 10


def wrong_digit(seed: int) -> int:
    """The digit noisy demonstrations answer instead of the secret."""
    return (secret_digit(seed) + 5) % 10


def noisy_demonstration(problem: dict, *, tool: bool, right: bool) -> str:
    """A demonstration of ``problem`` that makes the tool call or not and boxes the right digit or not."""
    meta = json.loads(problem["meta"])
    digit = meta["secret"] if right else meta["wrong"]
    if problem["kind"] == "code":
        return f"```python\ndef secret():\n    return {digit}\n```"
    call = f"Let me open it.\n```python\n{TOOL_CODE}\n```\n```output\nopened\n```\n" if tool else ""
    return f"{call}The answer is \\boxed{{{digit}}}."


def _meta(template: str, seed: int) -> str:
    return json.dumps({"template": template, "secret": secret_digit(seed), "wrong": wrong_digit(seed)})


def make_tool_problem(rng: random.Random, difficulty: int, index: int, seed: int) -> dict:
    subject = rng.choice(_SUBJECTS)
    digit = secret_digit(seed)
    problem = {
        "problem_id": f"secret-tool/d{difficulty}/s{seed}/{index}",
        "source": "synthetic:secret-tool",
        "kind": "math",
        "prompt": f"Case {index}: open the {subject}. Run Python code first, then give the secret digit.",
        "entry_point": None,
        "tests": None,
        "test_format": "none",
        "answer": str(digit),
        "reference_solution": TOOL_CODE + "\n",
        "difficulty": str(difficulty),
        "meta": _meta("secret-tool", seed),
    }
    problem["demonstration"] = noisy_demonstration(problem, tool=True, right=True)
    return problem


def make_code_problem(rng: random.Random, difficulty: int, index: int, seed: int) -> dict:
    subject = rng.choice(_SUBJECTS)
    digit = secret_digit(seed)
    return {
        "problem_id": f"secret-code/d{difficulty}/s{seed}/{index}",
        "source": "synthetic:secret-code",
        "kind": "code",
        "prompt": f"Case {index}: write a Python function `secret()` that returns the secret digit of the {subject}.",
        "entry_point": "secret",
        "tests": [f"assert secret() == {digit}"],
        "test_format": "asserts",
        "answer": None,
        "reference_solution": f"def secret():\n    return {digit}\n",
        "demonstration": None,
        "difficulty": str(difficulty),
        "meta": _meta("secret-code", seed),
    }
