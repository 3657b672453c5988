"""What the GTPO normalisation scopes and the MURPHY returns guarantee (maths.estimators, NORM_SCOPES table).

GTPO invariants, for every group of a batch:
  (a) every trajectory has the same turn rewards -> advantage 0 on every turn;
  (b) γ = 1, outcome-only reward -> every turn gets its trajectory's GRPO advantage, whatever the turn counts;
  (c) the only success (turn rewards 0, …, 0, 1) gets no negative turn, while the failures carry format
      penalties and a shaped final reward below 1 (c0: the same without shaping);
  (d) outcome-only reward, any γ > 0 -> GRPO advantage on every turn (up to ε / γ^d).
Each ✓ of the table is a hypothesis property below; each ✗ has a hand-computed counterexample.
MURPHY: (i) a sibling set that all passed carries no signal and is pruned; (ii) a node that passed is never
ranked below a sibling that failed and was repaired.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.estimators import NORM_SCOPES, grpo, gtpo, murphy, murphy_returns, prune, sibling_sets
from maths.segments import group_codes

EPS = 1e-6
S2 = 1 / math.sqrt(2)

KEEPS = {  # the NORM_SCOPES table: invariants each scope guarantees
    "end_aligned": {"a", "b", "c", "c0", "d"},
    "end_aligned_discounted": {"a", "b", "c", "c0"},
    "absorbing": {"a", "b", "c0"},
    "turn_position": {"a", "c0"},
    "group": set(),
    "batch": set(),
}


def _scopes(inv):
    return [s for s, keeps in KEEPS.items() if inv in keeps]


def _z(values):
    """Hand z-score of one set: (v − mean) / (sample std + ε)."""
    v = np.asarray(values, np.float64)
    return (v - v.mean()) / (v.std(ddof=1) + EPS)


def test_table_covers_every_scope():
    assert set(KEEPS) == set(NORM_SCOPES)


# --- GTPO, hand-computed ------------------------------------------------------------------------------------
def test_group_scope_reproduces_the_measured_bias_and_end_aligned_removes_it():
    # 4 successes of 3 turns, γ = 0.9: returns (0.81, 0.9, 1) each; group set = 12 returns, mean 2.71 / 3,
    # sample variance 4 · Σ dev² / 11 -> the measured (−1.15, −0.04, +1.19) on every trajectory
    turns, ids = [[0.0, 0.0, 1.0]] * 4, ["g"] * 4
    dev = np.array([0.81, 0.9, 1.0]) - 2.71 / 3
    std = math.sqrt(4 * (dev**2).sum() / 11)
    for a in gtpo(turns, ids, gamma=0.9, norm_scope="group"):
        np.testing.assert_allclose(a, dev / (std + EPS), rtol=1e-9)
        np.testing.assert_allclose(a, [-1.15, -0.04, 1.19], atol=0.005)
    for scope in _scopes("a"):
        assert all(a.tolist() == [0.0, 0.0, 0.0] for a in gtpo(turns, ids, gamma=0.9, norm_scope=scope))


def _tool_use_group():
    # A: tool call, tool call, right answer; B: direct right answer, −0.1 for no tool call; C: −0.1, wrong
    return [[0.0, 0.0, 1.0], [0.9], [-0.1, 0.0]], ["g"] * 3


def test_end_aligned_hand_computed():
    # γ = 0.5: R_A = (0.25, 0.5, 1), R_B = (0.9,), R_C = (−0.1, 0). Sets by turns left d:
    # d = 0: {A 1, B 0.9, C 0}; d = 1: {A 0.5, B idle 0.5 · 0.9, C −0.1}; d = 2: {A 0.25, B 0.25 · 0.9, C idle
    # 0.5 · −0.1} (= d = 1 halved: same z-scores up to ε)
    d0, d1, d2 = _z([1.0, 0.9, 0.0]), _z([0.5, 0.45, -0.1]), _z([0.25, 0.225, -0.05])
    adv = gtpo(*_tool_use_group(), gamma=0.5)  # the default scope
    np.testing.assert_allclose(adv[0], [d2[0], d1[0], d0[0]], rtol=1e-9)
    np.testing.assert_allclose(adv[1], [d0[1]], rtol=1e-9)
    np.testing.assert_allclose(adv[2], [d1[2], d0[2]], rtol=1e-9)
    assert (adv[0] > 0).all() and (adv[0] > adv[1][0]).all()  # the tool-using success beats the penalised one


def test_absorbing_hand_computed_punishes_the_tool_call_turn():
    # same group, forward positions; B and C keep their last return once ended:
    # j = 1: {A 0.25, B 0.9, C −0.1}; j = 2: {A 0.5, B 0.9, C 0}; j = 3: {A 1, B 0.9, C 0}
    p1, p2, p3 = _z([0.25, 0.9, -0.1]), _z([0.5, 0.9, 0.0]), _z([1.0, 0.9, 0.0])
    adv = gtpo(*_tool_use_group(), gamma=0.5, norm_scope="absorbing")
    np.testing.assert_allclose(adv[0], [p1[0], p2[0], p3[0]], rtol=1e-9)
    np.testing.assert_allclose(adv[1], [p1[1]], rtol=1e-9)
    np.testing.assert_allclose(adv[2], [p1[2], p2[2]], rtol=1e-9)
    assert adv[0][0] < 0  # the successful tool call ranks below a direct answer that was penalised


def test_violation_d_short_success_preferred_by_forward_scopes():
    # two successes, 1 and 2 turns, γ = 0.9: turn 1 sets {1, 0.9} -> the tool-call turn of the longer one is −
    turns, ids = [[1.0], [0.0, 1.0]], ["g", "g"]
    for scope in ("absorbing", "turn_position", "group"):
        assert gtpo(turns, ids, gamma=0.9, norm_scope=scope)[1][0] < 0
    assert all((a == 0).all() for a in gtpo(turns, ids, gamma=0.9))  # end_aligned: no signal, like GRPO


def test_violation_b_turn_position_with_unequal_turn_counts():
    # γ = 1, outcome-only; GRPO of (1, 0) is ±1/√2 on every turn
    adv = gtpo([[1.0], [0.0, 0.0, 0.0]], ["g", "g"], gamma=1.0, norm_scope="turn_position")
    np.testing.assert_allclose(adv[1], [-S2, 0.0, 0.0], atol=1e-5)  # positions 2, 3: the failure is alone
    adv = gtpo([[0.0, 0.0, 1.0], [0.0]], ["g", "g"], gamma=1.0, norm_scope="turn_position")
    np.testing.assert_allclose(adv[0], [S2, 0.0, 0.0], atol=1e-5)  # the success's last turns get no credit
    for scope in _scopes("b"):
        adv = gtpo([[0.0, 0.0, 1.0], [0.0]], ["g", "g"], gamma=1.0, norm_scope=scope)
        np.testing.assert_allclose(np.concatenate(adv), [S2, S2, S2, -S2], atol=1e-5)


def test_violation_b_group_scope_even_with_equal_turn_counts():
    # γ = 1: set {1, 1, 0, 0}: ±0.5 / √(1/3) = ±0.866, not GRPO's ±0.707
    adv = gtpo([[0.0, 1.0], [0.0, 0.0]], ["g", "g"], gamma=1.0, norm_scope="group")
    np.testing.assert_allclose(adv[0], [0.5 / (math.sqrt(1 / 3) + EPS)] * 2, rtol=1e-9)


def test_violation_c_shaped_failures_beat_an_early_turn_of_the_success():
    # γ = 0.5: S = (0, 0, 0, 1) -> R_S1 = 0.125; two failures with shaped final reward 0.3 in one turn
    turns, ids = [[0.0, 0.0, 0.0, 1.0], [0.3], [0.3]], ["g"] * 3
    for scope in ("absorbing", "turn_position"):  # turn 1: {0.125, 0.3, 0.3}
        adv = gtpo(turns, ids, gamma=0.5, norm_scope=scope)
        np.testing.assert_allclose(adv[0][0], _z([0.125, 0.3, 0.3])[0], rtol=1e-9)
        assert adv[0][0] < 0
    assert (gtpo(turns, ids, gamma=0.5)[0] > 0).all()


def test_violation_c_group_and_batch():
    # group, γ = 0.1: S = (0, 0, 1) -> (0.01, 0.1, 1), F = (0,): mean 1.11 / 4 = 0.2775 > 0.1
    adv = gtpo([[0.0, 0.0, 1.0], [0.0]], ["g", "g"], gamma=0.1, norm_scope="group")
    np.testing.assert_allclose(adv[0], _z([0.01, 0.1, 1.0, 0.0])[:3], rtol=1e-9)
    assert (adv[0][:2] < 0).all()
    # batch, γ = 0.5: g = S (0, 1) -> (0.5, 1), F (0); h = two one-turn successes. Set {0.5, 1, 0, 1, 1}
    adv = gtpo([[0.0, 1.0], [0.0], [1.0], [1.0]], ["g", "g", "h", "h"], gamma=0.5, norm_scope="batch")
    np.testing.assert_allclose(np.concatenate(adv), _z([0.5, 1.0, 0.0, 1.0, 1.0]), rtol=1e-9)
    assert adv[0][0] < 0  # (c)
    assert adv[2][0] > 0  # (a): h's identical trajectories get a signal from g


# --- GTPO, properties ---------------------------------------------------------------------------------------
rewards_st = st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 3))
turns_st = st.integers(1, 5)


@st.composite
def batches(draw, group_st):
    """Several groups drawn from ``group_st`` (a list of (turn rewards, tag) per group), rows shuffled.
    Returns (turn rewards, group ids, tags)."""
    groups = draw(st.lists(group_st, min_size=1, max_size=4))
    rows = [(g, t, tag) for g, members in enumerate(groups) for t, tag in members]
    order = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in order]
    return [r[1] for r in rows], np.array([r[0] for r in rows]), [r[2] for r in rows]


@st.composite
def identical_group(draw):
    seq = draw(st.lists(rewards_st, min_size=1, max_size=5))
    return [(seq, None)] * draw(st.integers(1, 6))


@st.composite
def outcome_group(draw):
    sizes = draw(st.lists(turns_st, min_size=1, max_size=6))
    return [([0.0] * (n - 1) + [draw(rewards_st)], None) for n in sizes]


@st.composite
def lone_success_group(draw, shaped):
    rows = [([0.0] * (draw(turns_st) - 1) + [1.0], True)]
    for _ in range(draw(st.integers(1, 5))):
        penalties = draw(st.lists(st.sampled_from([0.0, -0.1]), min_size=draw(turns_st), max_size=5))
        final = round(draw(st.floats(0.0, 0.99)), 3) if shaped else 0.0
        rows.append((penalties[:-1] + [penalties[-1] + final], False))
    return rows


@settings(max_examples=60, deadline=None)
@given(batches(identical_group()), st.floats(0, 1))
def test_a_identical_turn_rewards_give_zero(data, gamma):
    turns, ids, _ = data
    for scope in _scopes("a"):
        adv = gtpo(turns, ids, gamma=gamma, norm_scope=scope)
        assert np.concatenate(adv).tolist() == [0.0] * sum(map(len, turns)), scope


@settings(max_examples=60, deadline=None)
@given(batches(outcome_group()))
def test_b_gamma_one_outcome_only_is_grpo_for_any_turn_counts(data):
    turns, ids, _ = data
    ref = grpo([t[-1] for t in turns], ids)
    for scope in _scopes("b"):
        adv = gtpo(turns, ids, gamma=1.0, norm_scope=scope)
        for a, g in zip(adv, ref, strict=True):
            np.testing.assert_allclose(a, g, atol=1e-9, err_msg=scope)


@settings(max_examples=60, deadline=None)
@given(batches(outcome_group()), st.floats(0.3, 1.0))
def test_d_outcome_only_is_grpo_for_any_gamma(data, gamma):
    turns, ids, _ = data
    ref = grpo([t[-1] for t in turns], ids, eps=1e-12)
    for scope in _scopes("d"):
        adv = gtpo(turns, ids, gamma=gamma, norm_scope=scope, eps=1e-12)
        for a, g in zip(adv, ref, strict=True):
            np.testing.assert_allclose(a, g, atol=1e-6, err_msg=scope)


@settings(max_examples=60, deadline=None)
@given(st.booleans().flatmap(lambda shaped: batches(lone_success_group(shaped)).map(lambda b: (shaped, b))))
def test_c_the_only_success_gets_no_negative_turn(data):
    shaped, (turns, ids, success) = data
    for gamma in (0.0, 0.5, 0.9, 1.0):
        for scope in _scopes("c" if shaped else "c0"):
            adv = gtpo(turns, ids, gamma=gamma, norm_scope=scope)
            for a, s in zip(adv, success, strict=True):
                if s:
                    assert (a >= 0).all(), (scope, gamma, a)
                    if gamma > 0 and scope.startswith("end_aligned"):  # every set: the success is its max
                        assert (a > 0).all(), (scope, gamma, a)


@settings(max_examples=60, deadline=None)
@given(batches(outcome_group()), st.floats(-3, 3), st.floats(0.3, 1.0))
def test_end_aligned_adding_a_constant_to_every_outcome_changes_nothing(data, c, gamma):
    turns, ids, _ = data
    with_penalty = [[-0.1] + t for t in turns]  # intermediate rewards too
    shifted = [t[:-1] + [t[-1] + c] for t in with_penalty]
    for a, b in zip(gtpo(with_penalty, ids, gamma=gamma), gtpo(shifted, ids, gamma=gamma), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(batches(outcome_group()), st.floats(0.3, 1.0))
def test_end_aligned_discounted_is_gamma_to_the_turns_left_times_grpo(data, gamma):
    """The discount acts: with an outcome-only reward, turn j of a T-turn trajectory gets γ^(T−j) × its GRPO
    advantage (``end_aligned`` gives the GRPO advantage on every turn, property (d))."""
    turns, ids, _ = data
    ref = grpo([t[-1] for t in turns], ids, eps=1e-12)
    adv = gtpo(turns, ids, gamma=gamma, norm_scope="end_aligned_discounted", eps=1e-12)
    for a, g, t in zip(adv, ref, turns, strict=True):
        left = np.arange(len(t))[::-1]
        np.testing.assert_allclose(a, gamma**left * g, atol=1e-6)


def test_end_aligned_discounted_hand_computed():
    """Group of two: a 2-turn success (0, 1) and a 1-turn failure (0); γ = 0.5. Sets S_0 = {1, 0} (std 0.7071),
    S_1 = {0.5, 0.5 · 0 = 0} (std 0.3536); scale = 0.7071. Success: turn 1 (d = 1) (0.5 − 0.25) / 0.7071 =
    0.3536, turn 2 (d = 0) (1 − 0.5) / 0.7071 = 0.7071; failure: (0 − 0.5) / 0.7071 = −0.7071."""
    adv = gtpo([[0.0, 1.0], [0.0]], np.array([0, 0]), gamma=0.5, norm_scope="end_aligned_discounted", eps=0)
    np.testing.assert_allclose(adv[0], [0.25 / (2 * S2 * 0.5), 0.5 / (2 * S2 * 0.5)])  # / std{1, 0} = 1/√2
    np.testing.assert_allclose(adv[1], [-0.5 / (2 * S2 * 0.5)])


# --- MURPHY -------------------------------------------------------------------------------------------------
def _roots_and_repair(repairs):
    # roots: A passed at once (0), B passed 1/2 of the tests (1); B's children (repairs) below it
    parents = [-1, -1] + [1] * len(repairs)
    return parents, [1.0, 0.5, *repairs]


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_i_all_passed_siblings_carry_no_signal(mode):
    # roots 0, 1, 2 all pass; root 3 of tree u fails and its two repairs both pass
    tree_ids, parents = ["t", "t", "t", "u", "u", "u"], [-1, -1, -1, -1, 3, 3]
    r = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    ret = murphy_returns(parents, r, mode=mode)
    adv = murphy(tree_ids, parents, r, mode=mode)
    assert ret.tolist() == [1.0] * 6 and adv.tolist() == [0.0] * 6
    codes, n_trees = group_codes(tree_ids)
    sets, n = sibling_sets(codes, np.array(parents), n_trees)
    pruned, why = prune(ret, adv, sets, n)
    assert pruned.tolist() == [True] * 6 and why["zero_signal"] == 6


def test_ii_mars_a_repair_ties_with_a_direct_success_at_best():
    parents, r = _roots_and_repair([1.0, 1.0])
    assert murphy_returns(parents, r).tolist() == [1.0, 1.0, 1.0, 1.0]
    # γ_m < 1: the later success ranks lower
    assert murphy_returns(parents, r, gamma=0.9).tolist() == [1.0, 0.9, 1.0, 1.0]


def test_ii_mers_is_bounded_so_a_partial_failure_never_outranks_a_direct_success():
    # spec MeRS: R_B = 0.5 + mean(1, 1) = 1.5 > R_A = 1. Bounded: 0.5 + (1 − 0.5) · 1 = 1: a tie
    parents, r = _roots_and_repair([1.0, 1.0])
    assert murphy_returns(parents, r, mode="mean").tolist() == [1.0, 1.0, 1.0, 1.0]
    # repairs (1, 0): 0.5 + 0.5 · 0.5 = 0.75; the roots are ranked A above B
    parents, r = _roots_and_repair([1.0, 0.0])
    np.testing.assert_allclose(murphy_returns(parents, r, mode="mean"), [1.0, 0.75, 1.0, 0.0])
    np.testing.assert_allclose(murphy(["t"] * 4, parents, r, mode="mean")[:2], [S2, -S2], atol=1e-5)
    # a chain: B (0) -> C (0.5) -> two passing repairs. Spec: R_C = 1.5, R_B = 1.5. Bounded: R_C = R_B = 1
    parents, r = [-1, -1, 1, 2, 2], [1.0, 0.0, 0.5, 1.0, 1.0]
    assert murphy_returns(parents, r, mode="mean").tolist() == [1.0] * 5
    # γ_m = 0.5: R_C = 0.5 + 0.5 · 0.5 · 1 = 0.75, R_B = 0 + 1 · 0.5 · 0.75 = 0.375
    np.testing.assert_allclose(murphy_returns(parents, r, mode="mean", gamma=0.5), [1, 0.375, 0.75, 1, 1])
    # a passed node is a leaf whatever hangs below it: R = 1
    assert murphy_returns([-1, 0], [1.0, 0.0], mode="mean").tolist() == [1.0, 0.0]


def test_mers_needs_rewards_in_unit_interval():
    with pytest.raises(ValueError, match=r"node 1: reward 1.5 is outside \[0, 1\]"):
        murphy_returns([-1, 0], [0.0, 1.5], mode="mean")
    with pytest.raises(ValueError, match=r"node 0: reward -0.1 is outside \[0, 1\]"):
        murphy_returns([-1, 0], [-0.1, 1.0], mode="mean")


@st.composite
def forests(draw):
    n = draw(st.integers(1, 30))
    parents = [draw(st.integers(-1, i - 1)) if i else -1 for i in range(n)]
    tree_of = []
    for p in parents:
        tree_of.append(len(tree_of) if p < 0 else tree_of[p])
    rewards = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=n, max_size=n))
    return np.array(parents), np.array(rewards), np.array(tree_of)


@settings(max_examples=80, deadline=None)
@given(forests(), st.sampled_from(["max", "mean"]), st.floats(0, 1))
def test_murphy_properties_i_and_ii(data, mode, gamma):
    parents, r, tree_of = data
    ret = murphy_returns(parents, r, mode=mode, gamma=gamma)
    adv = murphy(tree_of, parents, r, mode=mode, gamma=gamma)
    assert ((ret >= r - 1e-12) & (ret <= 1.0 + 1e-12)).all()  # bounded by a direct success
    assert (ret[r == 1.0] == 1.0).all()
    codes, n_trees = group_codes(tree_of)
    sets, n = sibling_sets(codes, parents, n_trees)
    pruned, _ = prune(ret, adv, sets, n)
    for s in range(n):
        members = sets == s
        passed = members & (r == 1.0)
        if passed.any():  # (ii): a node that passed ranks at the top of its sibling set
            assert (adv[passed] >= adv[members].max() - 1e-9).all() and (adv[passed] >= -1e-12).all()
        if passed.sum() == members.sum():  # (i): all passed -> no signal, pruned
            assert (adv[members] == 0).all() and pruned[members].all()
