"""maths.paired: the exact sign test (McNemar's on 0/1 scores) by hand and by property, the paired comparison
pooled over seeds, the t-interval across seeds; maths.murphy.max_tree_nodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.murphy import max_tree_nodes
from maths.paired import discordant, mean_ci, paired_comparison, sign_test, t975


# --- by hand ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "wins, losses, p",
    [
        (7, 1, 18 / 256),  # issue 22: 7 gained, 1 lost -> 2 * (C(8,0) + C(8,1)) / 2^8 = 0.0703
        (5, 0, 2 / 32),  # 2 * 1/32
        (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
        (14, 2, 2 * (1 + 16 + 120) / 65536),
        (3, 3, 1.0),  # the middle: 2 * P(X <= 3 | n = 6) = 2 * 42/64 > 1 -> 1
        (0, 0, 1.0),  # no discordant pair: no evidence
        (1, 0, 1.0),  # 2 * 1/2
    ],
)
def test_sign_test_by_hand(wins, losses, p):
    assert sign_test(wins, losses) == pytest.approx(p, rel=1e-12)


def test_sign_test_is_exact_for_large_n():
    # 1000 vs 900: 2 * P(X <= 900 | n = 1900), summed exactly (no float underflow or overflow)
    exact = 2 * sum(math.comb(1900, i) for i in range(901)) / 2**1900
    assert sign_test(1000, 900) == pytest.approx(exact, rel=1e-12)
    assert sign_test(1000, 0) == pytest.approx(2.0**-999)  # near the smallest normal float, still exact
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_paired_comparison_by_hand():
    # two seeds x 10 problems; each seed: 7 problems gained, 1 lost, 2 unchanged (one solved by both)
    a1 = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    b1 = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1, 0])
    r1 = paired_comparison(a1, b1, resamples=2000)
    assert (r1["wins"], r1["losses"], r1["pairs"], r1["seeds"]) == (7, 1, 10, 1)
    assert r1["diff"] == pytest.approx(0.6) and r1["p_value"] == pytest.approx(18 / 256)
    assert r1["ci_low"] <= 0.6 <= r1["ci_high"]
    pooled = paired_comparison(np.stack([a1, a1]), np.stack([b1, b1]), resamples=2000)
    assert (pooled["wins"], pooled["losses"], pooled["pairs"], pooled["problems"]) == (14, 2, 20, 10)
    assert pooled["p_value"] == pytest.approx(274 / 65536)
    # the bootstrap resamples problems with all their seeds: two identical seeds give the one-seed interval
    assert (pooled["ci_low"], pooled["ci_high"]) == (r1["ci_low"], r1["ci_high"])
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_comparison(np.zeros((2, 3)), np.zeros((3, 2)))


def test_mean_ci_and_t_quantiles():
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    m, lo, hi = mean_ci([1.0, 3.0])  # mean 2, s = sqrt(2), half = 12.7062 * sqrt(2) / sqrt(2)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 12.7062, 2.0 + 12.7062))
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 15, 30, 31, 45, 80, 200, 5000):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_max_tree_nodes():
    assert max_tree_nodes(8, 8, 2) == 72  # issue 22: G = 8 trees exceed the default 64-node budget
    assert max_tree_nodes(4, 4, 2) == 20 and max_tree_nodes(2, 3, 3) == 2 * (1 + 3 + 9)
    assert max_tree_nodes(5, 7, 1) == 5
    with pytest.raises(ValueError):
        max_tree_nodes(0, 2, 2)


# --- properties ---------------------------------------------------------------------------------------------
counts = st.integers(min_value=0, max_value=200)  # wins, losses


@given(counts, counts)
def test_sign_test_symmetric_and_in_range(w, v):
    p = sign_test(w, v)
    assert p == sign_test(v, w) and 0.0 < p <= 1.0


@given(counts, counts)
def test_sign_test_matches_the_binomial_tail(w, v):
    n, k = w + v, min(w, v)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 0.5
    assert sign_test(w, v) == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


@given(counts, counts)
def test_more_lopsided_is_more_significant(w, v):
    """One more pair on the majority side never raises p; one more on the minority side never lowers it."""
    hi, lo = max(w, v), min(w, v)
    assert sign_test(hi + 1, lo) <= sign_test(hi, lo)
    assert sign_test(hi, lo + 1) >= sign_test(hi, lo) or lo + 1 > hi


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.sampled_from([0.01, 0.05, 0.1]))
def test_sign_test_keeps_its_size(n, alpha):
    """Under no difference (wins ~ Bin(n, 1/2)) the test rejects at level alpha with probability <= alpha."""
    reject = sum(math.comb(n, w) for w in range(n + 1) if sign_test(w, n - w) <= alpha) / 2**n
    assert reject <= alpha + 1e-12


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_paired_comparison_counts_and_mean(seeds, problems, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, (seeds, problems)).astype(float)
    b = rng.integers(0, 2, (seeds, problems)).astype(float)
    r = paired_comparison(a, b, resamples=200, seed=1)
    assert (r["wins"], r["losses"]) == discordant(a, b)
    assert r["diff"] == pytest.approx((b - a).mean()) and r["pairs"] == seeds * problems
    assert r["ci_low"] - 1e-12 <= r["diff"] <= r["ci_high"] + 1e-12
    swapped = paired_comparison(b, a, resamples=200, seed=1)
    assert swapped["p_value"] == r["p_value"] and swapped["diff"] == pytest.approx(-r["diff"])


def test_across_seeds_by_hand():
    """Two seeds' Δs −0.075 and +0.015: mean −0.030, s = 0.09/√2, half-width t(1) · s/√2 = 12.7062 · 0.045."""
    from maths.paired import across_seeds

    r = across_seeds([-0.075, 0.015])
    assert r["diff"] == pytest.approx(-0.030)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((-0.030 - 0.571779, -0.030 + 0.571779), abs=1e-6)
    assert (r["wins"], r["losses"], r["pairs"], r["p_value"]) == (1, 1, 2, None)
    # three seeds 0.34, 0.31, 0.28: s = 0.03, half-width 4.3027 · 0.03/√3
    r = across_seeds([0.34, 0.31, 0.28])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.31 - 0.0745249, 0.31 + 0.0745249), abs=1e-6)
    assert (r["wins"], r["losses"]) == (3, 0)
