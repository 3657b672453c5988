"""Reward functions, answer equivalence, GTPO turn rewards and shaping, similarity registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.estimators import gtpo_shaping
from maths.reward_fns import (
    REWARDS,
    combine,
    format_penalties,
    get_reward,
    last_number,
    lenient_answer,
    math_correct,
    turn_rewards,
)
from maths.similarity import SIMILARITIES, code_tokens, get_similarity, similarity
from schemas.params.rewards import ScoreParams


@pytest.mark.parametrize(
    ("pred", "ref", "ok"),
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("1,000", "1000", True),
        ("#### 18", "18", True),
        ("$18", "18", True),
        ("3/4", "0.75", True),
        ("\\frac{1}{2}", "0.5", True),
        ("$\\dfrac{1}{3}$", "1/3", True),
        ("\\sqrt{2}", "2^{1/2}", True),
        ("1.0000001", "1", True),  # within the default relative tolerance 1e-6
        ("1.001", "1", False),
        ("0.3333", "1/3", False),
        ("71", "72", False),
        (None, "72", False),
        ("", "72", False),
        ("\\frac{1}{", "0.5", False),  # unparseable: not equivalent, no crash
    ],
)
def test_math_correct(pred, ref, ok):
    assert math_correct(pred, ref) is ok


def test_math_correct_tolerance_is_a_parameter():
    assert math_correct("1.001", "1", rel_tol=1e-2)


def _rows():
    return [
        {
            "kind": "code",
            "tests_passed": 1,
            "tests_total": 2,
            "turns": [{"tool_call": "valid", "exec_status": "ok"}],
        },
        {
            "kind": "code",
            "tests_passed": 3,
            "tests_total": 3,
            "turns": [{"tool_call": "none", "exec_status": "none"}],
        },
        {"kind": "math", "final_answer": "0.5", "answer": "\\frac{1}{2}", "turns": []},
    ]


def test_reward_functions_apply_by_kind():
    p = ScoreParams()
    assert get_reward("tests_fraction")(_rows(), p) == [0.5, 1.0, None]
    assert get_reward("tests_all_pass")(_rows(), p) == [0.0, 1.0, None]
    assert get_reward("math_answer")(_rows(), p) == [None, None, 1.0]
    assert get_reward("format")(_rows(), p) == [0.0, pytest.approx(-0.1), None]
    with pytest.raises(ValueError, match="unknown reward function 'bleu'; valid: .*'math_answer'"):
        get_reward("bleu")
    assert {"tests_fraction", "tests_all_pass", "math_answer", "format"} <= set(REWARDS)


def test_combine_by_weights():
    total, comps = combine(_rows(), ScoreParams())  # default: tests_fraction + math_answer, weight 1
    assert total.tolist() == [0.5, 1.0, 1.0]
    assert comps[0] == {"tests_fraction": 0.5} and comps[2] == {"math_answer": 1.0}
    total, _ = combine(_rows(), ScoreParams(code_reward="binary"))
    assert total.tolist() == [0.0, 1.0, 1.0]
    # 0.5 * fraction + 0.5 * all-pass + 1 * format: row 1 = 0.5 + 0.5 - 0.1
    total, comps = combine(
        _rows()[:2], ScoreParams(reward_weights={"tests_fraction": 0.5, "tests_all_pass": 0.5, "format": 1.0})
    )
    np.testing.assert_allclose(total, [0.25, 0.9])
    with pytest.raises(ValueError, match="row 2 .*kind 'math'.*none of the reward components"):
        combine(_rows(), ScoreParams(reward_weights={"tests_fraction": 1.0}))


def test_format_penalties_and_turn_rewards():
    # trajectory 0: 3 turns (no call, invalid call, valid call); trajectory 1: one turn, no call but a syntax
    # error reported (both penalties apply to that turn: one without stacking, two with)
    tool = np.array(["none", "invalid", "valid", "none"])
    status = np.array(["none", "error", "ok", "syntax_error"])
    lengths = np.array([3, 1])
    pen = format_penalties(tool, status, lengths)
    np.testing.assert_allclose(pen, [-0.1, -0.1, 0.0, -0.1])
    np.testing.assert_allclose(format_penalties(tool, status, lengths, stack=True), [-0.1, -0.1, 0.0, -0.2])
    # r_ij = r_fmt + final reward on the last turn only: (−0.1, −0.1, 0 + 1), (−0.1 + 0.3)
    np.testing.assert_allclose(turn_rewards(np.array([1.0, 0.3]), pen, lengths), [-0.1, -0.1, 1.0, 0.2])


def test_lexical_similarity_hand_computed():
    # "a = 1": unigrams a, =, 1 + bigrams (a =), (= 1); "a = 2" shares a, =, (a =): cosine 3 / (√5 · √5) = 0.6
    assert code_tokens("a = 1  # note") == ["a", "=", "1"]
    assert similarity("a = 1", "a = 2") == pytest.approx(0.6)
    assert similarity("x = f(1)", "x = f(1)") == pytest.approx(1.0)
    assert similarity("x = f(1)", "") == 0.0
    assert similarity("import os", "while True: pass") == 0.0


def test_gtpo_shaping_hand_computed():
    codes = ["a = 1", "a = 2", "b", "a = 1", "z = 3"]
    success = [True, False, False, False, False]
    shaped = gtpo_shaping(codes, success, ["g", "g", "g", "g", "h"], alpha=0.5)
    # success 1; failures of g: 0.5 · sim to the one success; h has no success: 0
    np.testing.assert_allclose(shaped, [1.0, 0.5 * 0.6, 0.0, 0.5, 0.0])
    # two successes: the mean of the similarities, 0.5 · (1 + 0.6) / 2
    two = gtpo_shaping(["a = 1", "a = 2", "a = 1"], [True, True, False], [1, 1, 1], alpha=0.5)
    np.testing.assert_allclose(two[2], 0.5 * 1.6 / 2)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        gtpo_shaping(codes, success, [0] * 5, alpha=1.0)
    with pytest.raises(ValueError, match="unknown similarity 'bm25'; valid: .*'lexical'"):
        gtpo_shaping(codes, success, [0] * 5, similarity="bm25")


code_text = st.text(alphabet="abxy=+()[]:01 \n#'", max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(code_text, st.booleans(), st.integers(0, 2)), min_size=1, max_size=12),
    st.floats(0, 0.99),
)
def test_shaping_is_bounded_below_success(rows, alpha):
    codes, success, groups = zip(*rows, strict=True)
    shaped = gtpo_shaping(list(codes), list(success), list(groups), alpha=alpha)
    ok = np.array(success)
    assert np.all(shaped[ok] == 1.0)
    assert np.all((shaped[~ok] >= 0.0) & (shaped[~ok] <= alpha + 1e-12))
    has_success = {g for g, s in zip(groups, success, strict=True) if s}
    no_sib = np.array([not s and g not in has_success for s, g in zip(success, groups, strict=True)])
    assert np.all(shaped[no_sib] == 0.0)


@settings(max_examples=60, deadline=None)
@given(code_text, code_text)
def test_lexical_similarity_in_unit_interval_and_symmetric(a, b):
    s = similarity(a, b)
    assert 0.0 <= s <= 1.0 + 1e-12
    assert math.isclose(s, similarity(b, a), abs_tol=1e-12)
    if code_tokens(a):
        assert math.isclose(similarity(a, a), 1.0)


def test_embedding_similarity_needs_a_local_model():
    assert {"lexical", "embedding"} <= set(SIMILARITIES)
    with pytest.raises(ValueError, match="similarity 'embedding' needs a local encoder directory"):
        get_similarity("embedding")(["a"], np.array([True]), np.array([0]), 1)


@pytest.mark.slow
def test_embedding_similarity_with_a_local_model(tiny_model):
    codes = ["def f(x):\n    return x + 1", "def f(x):\n    return x + 1", "while True: pass"]
    shaped = gtpo_shaping(
        codes,
        [True, False, False],
        [0, 0, 0],
        similarity="embedding",
        similarity_options={"embedding_model": str(tiny_model)},
    )
    assert shaped[0] == 1.0
    assert shaped[1] == pytest.approx(0.5, abs=1e-5)  # identical code: (1 + cos 1) / 2 = 1, times α
    assert 0.0 <= shaped[2] <= 0.5


@pytest.mark.parametrize(
    ("text", "last", "lenient"),
    [
        ("The answer is 42.", "42", "42"),
        ("17 + 25 = 42", "42", "42"),
        ("It costs 1,234 dollars", "1234", "1234"),
        ("from 3 down to -7", "-7", "-7"),
        ("about 3.50 each", "3.50", "3.50"),
        ("\\boxed{5}, not 7", "7", "5"),  # a boxed answer wins
        ("no digits here", None, None),
        ("", None, None),
    ],
)
def test_last_number_and_lenient_answer(text, last, lenient):
    assert last_number(text) == last and lenient_answer(text) == lenient


@given(
    st.text(alphabet="abc .!?\n", max_size=20),
    st.integers(-(10**6), 10**6),
    st.text(alphabet="abc .!?", max_size=20),
)
def test_last_number_finds_the_final_integer(before, n, after):
    assert last_number(f"{before} {n}{after}") == str(n)


def test_lenient_math_reward_reads_the_last_turn_when_nothing_is_boxed():
    fn = get_reward("math_answer_lenient")
    rows = [
        {"kind": "math", "answer": "42", "final_answer": None, "last_text": "So 42."},
        {"kind": "math", "answer": "42", "final_answer": None, "last_text": "It is 42 or 41"},
        {"kind": "math", "answer": "42", "final_answer": "42", "last_text": "\\boxed{42} 7"},
        {"kind": "math", "answer": "42", "final_answer": "41", "last_text": "\\boxed{41} 42"},
        {"kind": "math", "answer": "42", "final_answer": None, "last_text": ""},
        {"kind": "code", "answer": None, "final_answer": None, "last_text": "42"},
    ]
    assert fn(rows, ScoreParams()) == [1.0, 0.0, 1.0, 0.0, 0.0, None]
