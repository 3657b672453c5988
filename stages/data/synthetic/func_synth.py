"""func-synth: "write ``def name(...)`` that …" with hidden assert tests (the MURPHY setting).

Each template is a small, parameterised function over strings, lists or integers: a description, a reference
implementation, a plausible *buggy* implementation (off-by-one, a missed edge case, a wrong boundary), and an
input generator that always includes the edge cases the bug gets wrong. So a wrong first attempt fails some
hidden tests with informative "expected vs got" feedback and can be repaired from it.

Rows: ``kind="code"``, ``test_format="asserts"``, ``tests`` = ``["assert name(args) == expected", …]`` (the
first one is shown in the prompt as an example, the rest are hidden), ``reference_solution`` = the reference
source, ``meta.buggy_solution`` = the buggy source. Expected values come from running the reference source
(our own template code, not model output) in-process. Difficulty 1..5: templates of tier <= difficulty are
drawn, 3 + difficulty tests, larger inputs.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    tier: int  # lowest difficulty that draws it
    signature: str  # "count_char(s)"
    description: str  # format string over params
    reference: str  # source, format string over params
    buggy: str  # source, format string over params
    params: Callable[[random.Random], dict]
    inputs: Callable[[random.Random, int, dict], list[tuple]]  # (rng, difficulty, params) -> arg tuples


def _word(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


TEMPLATES: list[Template] = [
    Template(
        "count_char",
        1,
        "count_char(s)",
        "returns how many times the character {c!r} appears in the string s, ignoring case",
        "def count_char(s):\n    return s.lower().count({c!r})\n",
        "def count_char(s):\n    return s.count({c!r})\n",
        lambda r: {"c": r.choice("aeiost")},
        lambda r, d, p: (
            [(p["c"].upper() + _word(r, 3) + p["c"],), ("",)]
            + [(_word(r, 4 + 2 * d, "abcdeiostABEIOST "),) for _ in range(d + 2)]
        ),
    ),
    Template(
        "sum_multiples",
        1,
        "sum_multiples(n)",
        "returns the sum of all positive integers below n that are multiples of {a} or {b}",
        "def sum_multiples(n):\n    return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)\n",
        "def sum_multiples(n):\n    return sum(i for i in range(1, n + 1) if i % {a} == 0 or i % {b} == 0)\n",
        lambda r: dict(zip("ab", r.sample([2, 3, 4, 5, 7], 2), strict=True)),
        lambda r, d, p: [(p["a"] * 4,), (1,)] + [(r.randint(2, 20 * d + 20),) for _ in range(d + 2)],
    ),
    Template(
        "clip_values",
        1,
        "clip_values(xs)",
        "returns a new list where every number of the list xs below {lo} is replaced by {lo} and every number "
        "above {hi} is replaced by {hi}",
        "def clip_values(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]\n",
        "def clip_values(xs):\n    return [{lo} if x < {lo} else x for x in xs]\n",
        lambda r: {"lo": r.randint(-5, 5), "hi": r.randint(10, 30)},
        lambda r, d, p: (
            [([p["lo"] - 1, p["hi"] + 1, 0],), ([],)] + [(_ints(r, 3 + d),) for _ in range(d + 2)]
        ),
    ),
    Template(
        "polynomial",
        1,
        "polynomial(x)",
        "returns the value of {a}*x**2 + {b}*x + {c} for an integer x",
        "def polynomial(x):\n    return {a} * x ** 2 + {b} * x + {c}\n",
        "def polynomial(x):\n    return {a} * x * 2 + {b} * x + {c}\n",
        lambda r: {"a": r.randint(2, 9), "b": r.randint(1, 9), "c": r.randint(0, 20)},
        lambda r, d, p: [(3,), (0,)] + [(r.randint(-10 * d, 10 * d),) for _ in range(d + 2)],
    ),
    Template(
        "every_nth",
        2,
        "every_nth(xs)",
        "returns every {k}-th element of the list xs, starting with the first element (index 0)",
        "def every_nth(xs):\n    return xs[::{k}]\n",
        "def every_nth(xs):\n    return xs[{k} - 1::{k}]\n",
        lambda r: {"k": r.randint(2, 4)},
        lambda r, d, p: (
            [(list(range(1, 2 * p["k"] + 2)),), ([],)] + [(_ints(r, 4 + 2 * d),) for _ in range(d + 2)]
        ),
    ),
    Template(
        "caesar",
        2,
        "caesar(s)",
        "shifts every lowercase letter of the string s forward by {k} places in the alphabet, wrapping around "
        "from 'z' to 'a', and leaves all other characters unchanged",
        "def caesar(s):\n    return ''.join(chr((ord(ch) - 97 + {k}) % 26 + 97) if 'a' <= ch <= 'z' else ch for ch in s)\n",
        "def caesar(s):\n    return ''.join(chr(ord(ch) + {k}) if 'a' <= ch <= 'z' else ch for ch in s)\n",
        lambda r: {"k": r.randint(1, 25)},
        lambda r, d, p: (
            [("xyz abc",), ("Hi!",)]
            + [(_word(r, 3 + 2 * d, "abcdefghijklmnopqrstuvwxyz ,"),) for _ in range(d + 2)]
        ),
    ),
    Template(
        "second_largest",
        2,
        "second_largest(xs)",
        "returns the second largest distinct value in the list of integers xs, or -1 if there are fewer "
        "than two distinct values",
        "def second_largest(xs):\n    values = sorted(set(xs))\n    return values[-2] if len(values) >= 2 else -1\n",
        "def second_largest(xs):\n    values = sorted(xs)\n    return values[-2] if len(values) >= 2 else -1\n",
        lambda r: {},
        lambda r, d, p: [([5, 5, 3],), ([7],)] + [(_ints(r, 3 + d, 0, 9),) for _ in range(d + 2)],
    ),
    Template(
        "run_length",
        3,
        "run_length(s)",
        "returns the run-length encoding of the string s: each maximal run of a repeated character becomes "
        "the character followed by the run's length, e.g. 'aaab' -> 'a3b1'",
        "def run_length(s):\n    out = []\n    i = 0\n    while i < len(s):\n        j = i\n"
        "        while j < len(s) and s[j] == s[i]:\n            j += 1\n        out.append(s[i] + str(j - i))\n"
        "        i = j\n    return ''.join(out)\n",
        "def run_length(s):\n    out = []\n    for ch in s:\n        if out and out[-1][0] == ch:\n"
        "            out[-1] = ch + str(int(out[-1][1:]) + 1)\n        else:\n            out.append(ch + '1')\n"
        "    return ''.join(out)[:-1] if len(s) > 3 else ''.join(out)\n",
        lambda r: {},
        lambda r, d, p: [("aaab",), ("zzzzy",)] + [(_word(r, 3 + 2 * d, "aab"),) for _ in range(d + 2)],
    ),
    Template(
        "count_long_words",
        3,
        "count_long_words(s)",
        "returns how many words of the string s (split on whitespace) have more than {k} characters",
        "def count_long_words(s):\n    return sum(1 for w in s.split() if len(w) > {k})\n",
        "def count_long_words(s):\n    return sum(1 for w in s.split(' ') if len(w) >= {k})\n",
        lambda r: {"k": r.randint(3, 5)},
        lambda r, d, p: (
            [("a" * p["k"] + "  " + "b" * (p["k"] + 1),), ("",)]
            + [(" ".join(_word(r, r.randint(1, 8)) for _ in range(2 + d)),) for _ in range(d + 2)]
        ),
    ),
]
BY_NAME = {t.name: t for t in TEMPLATES}


def _function(source: str, name: str) -> Callable:
    """Our own template source (trusted) -> the function it defines."""
    namespace: dict = {}
    exec(compile(source, f"<func-synth:{name}>", "exec"), namespace)  # noqa: S102
    return namespace[name]


def _call(args: tuple) -> str:
    return ", ".join(repr(a) for a in args)


def make_problem(rng: random.Random, difficulty: int, index: int, seed: int) -> dict:
    template = rng.choice([t for t in TEMPLATES if t.tier <= difficulty])
    p = template.params(rng)
    name = template.name
    reference, buggy = template.reference.format(**p), template.buggy.format(**p)
    fn = _function(reference, name)
    cases = template.inputs(rng, difficulty, p)[: 3 + difficulty]
    rng.shuffle(cases)
    expected = [fn(*args) for args in cases]
    tests = [f"assert {name}({_call(args)}) == {out!r}" for args, out in zip(cases, expected, strict=True)]
    prompt = (
        f"Write a Python function `{template.signature}` that {template.description.format(**p)}.\n"
        f"For example, `{name}({_call(cases[0])})` should return `{expected[0]!r}`."
    )
    return {
        "problem_id": f"func-synth/d{difficulty}/s{seed}/{index}",
        "source": "synthetic:func-synth",
        "kind": "code",
        "prompt": prompt,
        "entry_point": name,
        "tests": tests,
        "test_format": "asserts",
        "answer": None,
        "reference_solution": reference,
        "demonstration": None,
        "difficulty": str(difficulty),
        "meta": json.dumps({"template": name, "params": p, "buggy_solution": buggy}, sort_keys=True),
    }
