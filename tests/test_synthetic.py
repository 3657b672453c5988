"""Synthetic families: determinism, difficulty knob, and every reference solution passing its own tests in the
real sandbox (func-synth buggy attempts failing with repairable feedback; tool-arith transcripts matching
what their code prints)."""

from __future__ import annotations

import json
import re

import pytest

from maths.prompts import demonstration_transcript, extract_boxed, extract_code
from stages.data.synthetic import FAMILIES, func_synth, generate, tool_arith


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_is_deterministic(family):
    a = generate(family, count=12, seed=7, difficulty=2)
    assert generate(family, count=12, seed=7, difficulty=2) == a
    assert generate(family, count=5, seed=7, difficulty=2) == a[:5]  # problem i depends only on i
    b = generate(family, count=12, seed=8, difficulty=2)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    assert len({r["problem_id"] for r in a + b}) == 24
    assert len({r["prompt"] for r in generate(family, count=64)}) >= 60


def test_unknown_family_and_difficulty_fail():
    with pytest.raises(ValueError, match="unknown synthetic family 'x'"):
        generate("x", count=1)
    with pytest.raises(ValueError, match="difficulty must be in 1..5"):
        generate("tool-arith", count=1, difficulty=6)


def test_difficulty_knob_scales_the_tasks():
    easy = generate("func-synth", count=20, difficulty=1)
    hard = generate("func-synth", count=20, difficulty=5)
    assert {len(r["tests"]) for r in easy} == {4} and {len(r["tests"]) for r in hard} == {8}
    assert {json.loads(r["meta"])["template"] for r in easy} <= {
        t.name for t in func_synth.TEMPLATES if t.tier == 1
    }
    arith_easy = generate("tool-arith", count=40, difficulty=1)
    arith_hard = generate("tool-arith", count=40, difficulty=5)
    median = lambda rows: sorted(abs(int(r["answer"])) for r in rows)[len(rows) // 2]  # noqa: E731
    assert median(arith_hard) > 10 * median(arith_easy)
    assert all(r["difficulty"] == "5" for r in arith_hard)


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_func_synth_references_pass_and_buggy_attempts_fail_with_feedback(difficulty):
    from runtime.sandbox import feedback_text, run_tests_many

    rows = generate("func-synth", count=24, seed=difficulty, difficulty=difficulty)
    tests = [r["tests"] for r in rows]
    good = run_tests_many([r["reference_solution"] for r in rows], tests)
    assert [(r.passed, r.total) for r in good] == [(len(t), len(t)) for t in tests]
    bad = run_tests_many([json.loads(r["meta"])["buggy_solution"] for r in rows], tests)
    for row, rep in zip(rows, bad, strict=True):
        assert rep.passed < rep.total, f"{row['problem_id']}: buggy solution passes every test"
        text = feedback_text(rep)
        assert f"{rep.passed}/{rep.total}" in text and row["entry_point"] in text


def test_func_synth_rows_are_self_consistent():
    for r in generate("func-synth", count=64, difficulty=5):
        name = r["entry_point"]
        assert r["prompt"].startswith(f"Write a Python function `{name}(")
        assert all(t.startswith(f"assert {name}(") for t in r["tests"])
        example_call = r["tests"][0].removeprefix("assert ").split(" == ")[0]
        assert f"`{example_call}`" in r["prompt"]  # the first test is the shown example
        assert (r["kind"], r["test_format"], r["answer"]) == ("code", "asserts", None)


@pytest.mark.parametrize("difficulty", [1, 4])
def test_tool_arith_references_and_transcripts_match_execution(difficulty):
    from runtime.sandbox import execute_many

    rows = generate("tool-arith", count=24, seed=difficulty, difficulty=difficulty)
    results = execute_many([r["reference_solution"] for r in rows])
    assert [x.stdout.strip() for x in results] == [r["answer"] for r in rows]

    blocks, observed = [], []
    for r in rows:
        parts = demonstration_transcript(r)
        kinds = [k for k, _ in parts]
        assert kinds[-1] == "completion" and kinds.count("observation") == json.loads(r["meta"])["steps"]
        assert kinds == ["completion", "observation"] * kinds.count("observation") + ["completion"]
        for (_, completion), (_, observation) in zip(parts[::2], parts[1::2], strict=False):
            assert completion.endswith("\n```\n")  # a turn ends where the rollout's stop string ends it
            blocks.append(extract_code(completion))
            observed.append(re.fullmatch(r"```output\n(.*)\n```\n", observation, re.S).group(1))
        assert extract_boxed(parts[-1][1]) == r["answer"]
    outputs = execute_many(blocks)
    assert [x.stdout.rstrip("\n") for x in outputs] == observed


def test_tool_arith_rows_are_math_problems():
    for r in generate("tool-arith", count=32, difficulty=3):
        assert (r["kind"], r["test_format"], r["tests"], r["entry_point"]) == ("math", "none", None, None)
        assert re.fullmatch(r"-?\d+", r["answer"])
        assert json.loads(r["meta"])["template"] in tool_arith.TEMPLATES
