"""Record formats: one normaliser per raw problem-set format, mapping a record to a ``schemas.tables.PROBLEMS`` row.

Registry ``FORMATS`` (name -> Format). A normaliser takes ``(record, ctx)`` and returns the row without
``split`` (the data stage assigns it), or raises ``BadRecord(field, reason)``. ``detect_format(keys)`` picks
the first format whose required fields a record has (used by ``--format auto``).

Formats:
- ``humaneval``: ``task_id, prompt, entry_point, test`` (a ``check(candidate)`` block) [+ ``canonical_solution``].
  Also the HumanEval-format MBPP file shipped in stages/data/benchmarks/mbpp (tab-indented prompts).
- ``mbpp``: original MBPP: ``task_id, text, code, test_list`` (assert statements) [+ ``test_setup_code``].
- ``gsm8k``: ``question, answer`` where the answer ends in ``#### N``.
- ``math``: a question under one of several names (``problem``, ``question``, ``body``+``question``,
  ``Body``+``Question``) and an answer under ``answer``/``Answer``, or a ``\\boxed{}`` in ``solution``.
  Covers MATH, AIME24, AMC23, SVAMP, ASDiv, Minerva-Math as the Qwen2.5-Math kit distributes them.
- ``problems``: records already in our schema (``problem_id, kind, prompt, test_format`` …).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PROBLEM_FIELDS = (
    "problem_id",
    "source",
    "kind",
    "prompt",
    "entry_point",
    "tests",
    "test_format",
    "answer",
    "reference_solution",
    "demonstration",
    "difficulty",
    "meta",
)


class BadRecord(ValueError):
    """A raw record cannot be normalised: names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Context:
    """Where a record comes from: ``source`` label (e.g. "gsm8k") and a fallback id (e.g. "gsm8k/test/12")."""

    source: str
    default_id: str


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[tuple[str, ...], ...]  # any one key-set suffices for auto detection
    normalise: Callable[[Mapping[str, Any], Context], dict]
    description: str = ""


FORMATS: dict[str, Format] = {}


def register(name: str, required: tuple[tuple[str, ...], ...], description: str):
    def deco(fn):
        FORMATS[name] = Format(name, required, fn, description)
        return fn

    return deco


# --- helpers ------------------------------------------------------------------------------------------------
def _text(rec: Mapping, key: str) -> str:
    v = rec.get(key)
    if v is None:
        raise BadRecord(key, "missing")
    if not isinstance(v, str):
        raise BadRecord(key, f"expected text, got {type(v).__name__}")
    if not v.strip():
        raise BadRecord(key, "empty")
    return v


def _check_parses(field: str, tests: list[str]) -> None:
    """Test code that is not valid Python would fail every program, the reference solution included: refuse it
    here instead of scoring 0 everywhere."""
    for i, code in enumerate(tests):
        try:
            ast.parse(code)
        except SyntaxError as e:
            where = f"[{i}]" if len(tests) > 1 else ""
            raise BadRecord(f"{field}{where}", f"is not valid Python ({e.msg}, line {e.lineno})") from None


def _row(**kw) -> dict:
    row = dict.fromkeys(PROBLEM_FIELDS)
    row.update(kw)
    if isinstance(row["meta"], dict):
        row["meta"] = json.dumps(row["meta"], sort_keys=True, default=str) if row["meta"] else None
    return row


def _record_id(rec: Mapping, ctx: Context, *keys: str) -> str:
    for k in keys:
        v = rec.get(k)
        if v is not None and str(v).strip():
            v = str(v).strip()
            return v if "/" in v else f"{ctx.source}/{v}"
    return ctx.default_id


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{}``/``\\framebox{}``) in ``text``, braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox|framebox)\s*\{", text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


_UNIT_SUFFIX = re.compile(r"^\s*(-?[\d.,/]+)\s*\(.*\)\s*$")  # ASDiv: "9 (apples)"


def normalise_answer(value: Any) -> str:
    """Reference answer as text: 27.0 -> "27", "1,000" -> "1000", "9 (apples)" -> "9"; other text stripped."""
    if isinstance(value, bool):
        raise BadRecord("answer", f"expected a number or text, got {value!r}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BadRecord("answer", f"not a finite number: {value!r}")
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("answer", "missing or empty")
    s = value.strip()
    m = _UNIT_SUFFIX.match(s)
    if m:
        s = m.group(1)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


# --- code formats ----------------------------------------------------------------------------------------
@register(
    "humaneval", (("prompt", "entry_point", "test"),), "HumanEval: prompt, entry_point, check(candidate)"
)
def _humaneval(rec: Mapping, ctx: Context) -> dict:
    prompt, entry, test = _text(rec, "prompt"), _text(rec, "entry_point"), _text(rec, "test")
    if "def check(" not in test:
        raise BadRecord("test", "has no `def check(candidate)` function")
    if not entry.isidentifier():
        raise BadRecord("entry_point", f"{entry!r} is not a Python identifier")
    _check_parses("test", [test])
    solution = rec.get("canonical_solution")
    extras = {k: rec[k] for k in ("description", "language") if rec.get(k) is not None}
    return _row(
        problem_id=_record_id(rec, ctx, "task_id"),
        source=ctx.source,
        kind="code",
        prompt=prompt,
        entry_point=entry,
        tests=[test],
        test_format="check",
        reference_solution=prompt + solution if isinstance(solution, str) and solution.strip() else None,
        meta=extras,
    )


_DEF_NAME = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.M)


@register("mbpp", (("text", "code", "test_list"),), "MBPP: text, code, test_list of asserts")
def _mbpp(rec: Mapping, ctx: Context) -> dict:
    text, code = _text(rec, "text"), _text(rec, "code")
    tests = rec.get("test_list")
    if not isinstance(tests, list | tuple) or not tests:
        raise BadRecord("test_list", "missing or not a non-empty list")
    if not all(isinstance(t, str) and t.strip().startswith("assert") for t in tests):
        raise BadRecord("test_list", "every entry must be an assert statement")
    names = [n for n in _DEF_NAME.findall(code) if any(re.search(rf"\b{n}\s*\(", t) for t in tests)]
    if not names:
        raise BadRecord("code", "defines no function that the tests call")
    setup = rec.get("test_setup_code") or ""
    tests = [f"{setup.strip()}\n{t}" if setup.strip() else t for t in tests]
    _check_parses("test_list", tests)
    prompt = f"{text.strip()}\nYour code should pass this test:\n{tests[0].splitlines()[-1]}"
    return _row(
        problem_id=_record_id(rec, ctx, "task_id"),
        source=ctx.source,
        kind="code",
        prompt=prompt,
        entry_point=names[0],
        tests=list(tests),
        test_format="asserts",
        reference_solution=code.replace("\r\n", "\n"),
        meta={"challenge_test_list": rec.get("challenge_test_list")}
        if rec.get("challenge_test_list")
        else None,
    )


# --- math formats ----------------------------------------------------------------------------------------
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


@register("gsm8k", (("question", "answer"),), "GSM8K: question, answer ending in '#### N'")
def _gsm8k(rec: Mapping, ctx: Context) -> dict:
    question, worked = _text(rec, "question"), _text(rec, "answer")
    m = _GSM8K_FINAL.search(worked.strip())
    if not m:
        raise BadRecord("answer", "has no final '#### N' line")
    return _row(
        problem_id=_record_id(rec, ctx, "id", "idx"),
        source=ctx.source,
        kind="math",
        prompt=question.strip(),
        test_format="none",
        answer=normalise_answer(m.group(1)),
        reference_solution=worked,
    )


# Question fields, in order of preference: a single field, or a (context, question) pair joined with a space.
_QUESTION_FIELDS: tuple[tuple[str, ...], ...] = (
    ("problem",),
    ("body", "question"),
    ("Body", "Question"),
    ("question",),
    ("Question",),
)
_ANSWER_FIELDS = ("answer", "Answer", "final_answer")
_EXTRA_FIELDS = ("type", "level", "Type", "solution_type", "subject", "url", "formula", "Equation")


@register(
    "math",
    (("problem",), ("question", "solution"), ("Body", "Question"), ("body", "question")),
    "MATH-style: problem/question (+ body) and answer, or \\boxed{} in solution",
)
def _math(rec: Mapping, ctx: Context) -> dict:
    keys = next((ks for ks in _QUESTION_FIELDS if all(isinstance(rec.get(k), str) for k in ks)), None)
    if keys is None:
        raise BadRecord("problem", "missing (looked for problem, question, body+question, Body+Question)")
    prompt = " ".join(_text(rec, k).strip() for k in keys)
    solution = rec.get("solution") if isinstance(rec.get("solution"), str) else None
    raw = next((rec[k] for k in _ANSWER_FIELDS if rec.get(k) is not None), None)
    if raw is None and solution:
        raw = last_boxed(solution)
        if raw is None:
            raise BadRecord("solution", "has no \\boxed{} answer and there is no answer field")
    if raw is None:
        raise BadRecord("answer", "missing (no answer field and no solution)")
    level = rec.get("level")
    return _row(
        problem_id=_record_id(rec, ctx, "unique_id", "ID", "id", "idx"),
        source=ctx.source,
        kind="math",
        prompt=prompt,
        test_format="none",
        answer=normalise_answer(raw),
        reference_solution=solution,
        difficulty=str(level) if level is not None else None,
        meta={k: rec[k] for k in _EXTRA_FIELDS if rec.get(k) is not None},
    )


# --- our own schema --------------------------------------------------------------------------------------
_KINDS = {"code": ("asserts", "check"), "math": ("none",)}


@register("problems", (("problem_id", "kind", "prompt", "test_format"),), "turntree problems rows")
def _problems(rec: Mapping, ctx: Context) -> dict:
    kind, fmt = _text(rec, "kind"), _text(rec, "test_format")
    if kind not in _KINDS:
        raise BadRecord("kind", f"{kind!r} is not one of {sorted(_KINDS)}")
    if fmt not in _KINDS[kind]:
        raise BadRecord("test_format", f"{fmt!r} does not fit kind {kind!r} (expected one of {_KINDS[kind]})")
    tests = rec.get("tests")
    if kind == "code":
        if not isinstance(tests, list | tuple) or not tests or not all(isinstance(t, str) for t in tests):
            raise BadRecord("tests", "a code problem needs a non-empty list of test strings")
        _text(rec, "entry_point")
        _check_parses("tests", list(tests))
    elif rec.get("answer") is None:
        raise BadRecord("answer", "a math problem needs an answer")
    row = _row(**{k: rec.get(k) for k in PROBLEM_FIELDS})
    row.update(problem_id=_text(rec, "problem_id"), prompt=_text(rec, "prompt"))
    row["source"] = rec.get("source") or ctx.source
    row["tests"] = list(tests) if tests is not None else None
    if kind == "math":
        row["answer"] = normalise_answer(rec["answer"])
    if isinstance(rec.get("meta"), dict):
        system = rec["meta"].get("system")
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise BadRecord("meta.system", "must be a non-empty string (the problem's own system prompt)")
        row["meta"] = json.dumps(rec["meta"], sort_keys=True)
    return row


# Auto-detection order: most specific first (gsm8k's keys are a subset of several math sets').
DETECT_ORDER = ("problems", "humaneval", "mbpp", "gsm8k", "math")


def detect_format(rec: Mapping) -> str | None:
    """Name of the first format (in DETECT_ORDER) whose required fields ``rec`` has; gsm8k needs '####'."""
    for name in DETECT_ORDER:
        fmt = FORMATS[name]
        if any(all(k in rec for k in keys) for keys in fmt.required):
            if name == "gsm8k" and "####" not in str(rec.get("answer", "")):
                continue
            return name
    return None
