"""Array-level advantage estimators: hand-computed cases, hypothesis properties, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.estimators import (
    ESTIMATORS,
    get_estimator,
    grpo,
    gtpo,
    murphy,
    murphy_returns,
    prune,
    sibling_sets,
)
from maths.segments import group_codes, segment_zscore

EPS = 1e-6


# --- hand-computed ------------------------------------------------------------------------------------------
def test_grpo_hand_computed():
    # group a = [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), sample var (4/9 + 1/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3)
    adv = grpo([1.0, 0.0, 0.0, 5.0], ["a", "a", "a", "b"])
    np.testing.assert_allclose(
        adv[:3], [(2 / 3) / (std + EPS), (-1 / 3) / (std + EPS), (-1 / 3) / (std + EPS)]
    )
    assert adv[3] == 0.0  # a group of one gets 0


def test_dr_grpo_hand_computed():
    adv = grpo([1.0, 0.0, 0.0, 5.0], [7, 7, 7, 9], scale_by_std=False)
    np.testing.assert_allclose(adv, [2 / 3, -1 / 3, -1 / 3, 0.0])


def test_grpo_ties_are_exactly_zero_and_groups_need_not_be_contiguous():
    adv = grpo([0.1, 0.3, 0.1, 0.1, 0.7], ["a", "b", "a", "a", "b"])
    assert adv[[0, 2, 3]].tolist() == [0.0, 0.0, 0.0]
    d = 0.2 / (math.sqrt(0.08) + EPS)  # b = [0.3, 0.7]: mean 0.5, sample var (0.04 + 0.04) / 1
    np.testing.assert_allclose(adv[[1, 4]], [-d, d])


def _z(values, std):
    return [v / (std + EPS) for v in values]


def test_gtpo_three_turns_gamma_09_group_scope():
    # trajectory 0: r = (-0.1, 0, 1): R3 = 1, R2 = 0 + 0.9 * 1 = 0.9, R1 = -0.1 + 0.9 * 0.9 = 0.71
    # trajectory 1: r = (0, 0): R = (0, 0). Set = {0.71, 0.9, 1, 0, 0}, mean 2.61 / 5 = 0.522
    returns = [0.71, 0.9, 1.0, 0.0, 0.0]
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 4)
    adv = gtpo([[-0.1, 0.0, 1.0], [0.0, 0.0]], ["g", "g"], gamma=0.9, norm_scope="group")
    np.testing.assert_allclose(adv[0], _z([0.71 - mean, 0.9 - mean, 1.0 - mean], std), rtol=1e-9)
    np.testing.assert_allclose(adv[1], _z([-mean, -mean], std), rtol=1e-9)


def test_gtpo_turn_position_scope():
    # positions: 0 -> {0.71, 0}, 1 -> {0.9, 0}, 2 -> {1} (alone: 0). Two members: deviations ±d, std = d·√2
    adv = gtpo([[-0.1, 0.0, 1.0], [0.0, 0.0]], ["g", "g"], gamma=0.9, norm_scope="turn_position")
    for j, r in enumerate([0.71, 0.9]):
        d, std = r / 2, math.sqrt(2 * (r / 2) ** 2)
        np.testing.assert_allclose([adv[0][j], adv[1][j]], [d / (std + EPS), -d / (std + EPS)], rtol=1e-9)
    assert adv[0][2] == 0.0


def test_gtpo_batch_scope_and_gamma_one():
    # gamma 1: returns are suffix sums. g: (0.5, 1) -> R (1.5, 1); h: (0,) -> R (0,). Batch set {1.5, 1, 0}
    returns = [1.5, 1.0, 0.0]
    mean = 2.5 / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 2)
    adv = gtpo([[0.5, 1.0], [0.0]], ["g", "h"], gamma=1.0, norm_scope="batch")
    np.testing.assert_allclose(np.concatenate(adv), _z([x - mean for x in returns], std), rtol=1e-9)
    # with norm_scope "group", h is alone: 0
    assert gtpo([[0.5, 1.0], [0.0]], ["g", "h"], gamma=1.0, norm_scope="group")[1].tolist() == [0.0]


def test_gtpo_gamma_zero_uses_turn_rewards_only():
    adv = gtpo([[1.0, 0.0], [0.0, 1.0]], ["g", "g"], gamma=0.0, norm_scope="turn_position")
    np.testing.assert_allclose(np.concatenate(adv), _z([0.5, -0.5, -0.5, 0.5], math.sqrt(0.5)), rtol=1e-9)


def _tree():
    # roots 0 (r 0), 1 (r 1); 0 -> 2 (r 0.5), 3 (r 0); 3 -> 4 (r 1), 5 (r 0)
    return [-1, -1, 0, 0, 3, 3], [0.0, 1.0, 0.5, 0.0, 1.0, 0.0]


def test_murphy_returns_mars():
    # R4 = 1, R5 = 0, R3 = max(0, 1, 0) = 1, R2 = 0.5, R0 = max(0, 0.5, 1) = 1, R1 = 1
    parents, r = _tree()
    assert murphy_returns(parents, r).tolist() == [1.0, 1.0, 0.5, 1.0, 1.0, 0.0]


def test_murphy_returns_mers():
    # γ = 1: R3 = 0 + (1 + 0) / 2 = 0.5, R0 = 0 + (0.5 + 0.5) / 2 = 0.5
    parents, r = _tree()
    np.testing.assert_allclose(murphy_returns(parents, r, mode="mean"), [0.5, 1.0, 0.5, 0.5, 1.0, 0.0])
    # γ = 0.5: R3 = 0 + 0.5 * 0.5 = 0.25, R0 = 0 + 0.5 * (0.5 + 0.25) / 2 = 0.1875
    np.testing.assert_allclose(
        murphy_returns(parents, r, mode="mean", gamma=0.5), [0.1875, 1.0, 0.5, 0.25, 1.0, 0.0]
    )


def test_murphy_advantages_by_sibling_group():
    # MaRS returns (1, 1 | 0.5, 1 | 1, 0): roots tie -> 0; {0.5, 1} and {1, 0}: two members -> ±1/√2
    parents, r = _tree()
    adv = murphy(["t"] * 6, parents, r)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(adv, [0, 0, -s, s, s, -s], atol=1e-5)
    # two trees with global positions: roots of different trees are different groups
    adv2 = murphy(["t", "t", "u", "u"], [-1, -1, -1, 2], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(adv2, [s, -s, 0.0, 0.0], atol=1e-5)


def test_prune_zero_signal_inter_and_intra():
    # sets: A = nodes 0-3 returns (0, 1, 0.5, 0.2) std high; B = nodes 4-5 returns (0.4, 0.5); C = 6-7 tie
    ret = np.array([0.0, 1.0, 0.5, 0.2, 0.4, 0.5, 0.3, 0.3])
    sets = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    adv = segment_zscore(ret, sets, 3)
    pruned, why = prune(ret, adv, sets, 3)
    assert pruned.tolist() == [False] * 6 + [True, True] and why == {"zero_signal": 2, "inter": 0, "intra": 0}
    pruned, why = prune(ret, adv, sets, 3, inter_keep=1)  # keep A only (largest std)
    assert pruned.tolist() == [False] * 4 + [True] * 4 and why["inter"] == 2
    pruned, why = prune(ret, adv, sets, 3, intra_keep=2)  # A keeps its min (0) and max (1)
    assert pruned.tolist() == [False, False, True, True, False, False, True, True] and why["intra"] == 2
    pruned, _ = prune(ret, adv, sets, 3, intra_keep=3, keep_zero_signal=True)  # lowest 2 + highest 1
    assert pruned.tolist() == [False, False, True, False, False, False, False, False]


def test_estimator_registry():
    assert {"grpo", "dr_grpo", "gtpo", "murphy"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid: .*'dr_grpo'.*'gtpo'"):
        get_estimator("ppo")
    for est in ESTIMATORS.values():  # every entry honours its declared contract
        assert est.table in {"trajectories", "trees"} and est.unit in {"trajectory", "turn", "node"}


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: grpo([1.0, 0.0, float("nan")], ["a", "a", "a"]), r"rewards\[2\] is nan"),
        (lambda: grpo([1.0, float("inf")], [1, 1]), r"rewards\[1\] is inf"),
        (lambda: grpo([], []), "empty"),
        (lambda: grpo([1.0, 0.0], ["a", None]), r"group_ids\[1\] is missing"),
        (lambda: grpo([1.0, 0.0], ["a", ""]), r"group_ids\[1\] is an empty string"),
        (lambda: grpo([1.0, 0.0, 1.0], ["a", "a"]), "3 rows but group_ids has 2"),
        (lambda: gtpo([[1.0], []], ["a", "a"]), r"turn_rewards\[1\] is empty"),
        (lambda: gtpo([[1.0], [0.0, float("nan")]], ["a", "a"]), r"turn_rewards\[1\] has a non-finite"),
        (lambda: gtpo([[1.0]], ["a"], norm_scope="episode"), "unknown norm_scope 'episode'"),
        (lambda: murphy_returns([-1, 0, 7], [0.0, 1.0, 0.0]), "node 2: parent 7 is missing"),
        (lambda: murphy_returns([-1, 2, 1], [0.0, 1.0, 0.0]), "node 1: .*cycle"),
        (lambda: murphy_returns([0], [1.0]), "node 0: .*cycle"),
        (lambda: murphy_returns([-1, 0], [0.0, float("nan")]), r"rewards\[1\] is nan"),
        (lambda: murphy_returns([-1, 0], [0.0, 1.0], mode="median"), "unknown mode 'median'"),
        (lambda: murphy(["t", "u"], [-1, 0], [0.0, 1.0]), "node 1: its parent 0 belongs to another tree"),
    ],
)
def test_bad_input_names_the_row(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- properties ---------------------------------------------------------------------------------------------
rewards_st = st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def groups(draw, min_size=1):
    sizes = draw(st.lists(st.integers(1, 6), min_size=min_size, max_size=6))
    ids = [g for g, n in enumerate(sizes) for _ in range(n)]
    order = draw(st.permutations(range(len(ids))))
    ids = [ids[i] for i in order]
    rewards = draw(st.lists(rewards_st, min_size=len(ids), max_size=len(ids)))
    return np.array(rewards), np.array(ids)


@settings(max_examples=60, deadline=None)
@given(groups())
def test_grpo_zero_mean_per_group(data):
    r, ids = data
    for scale in (True, False):
        adv = grpo(r, ids, scale_by_std=scale)
        for g in np.unique(ids):
            assert abs(adv[ids == g].mean()) < 1e-6


@settings(max_examples=60, deadline=None)
@given(groups(), st.floats(-100, 100), st.floats(0.5, 20))
def test_grpo_shift_and_scale_invariance(data, shift, scale):
    r, ids = data
    base = grpo(r, ids)
    np.testing.assert_allclose(grpo(r + shift, ids), base, atol=1e-4)
    # positive scale: invariant up to ε (c·d / (c·s + ε) vs d / (s + ε)), so compare with a negligible ε
    np.testing.assert_allclose(grpo(r * scale, ids, eps=1e-12), grpo(r, ids, eps=1e-12), atol=1e-6)
    np.testing.assert_allclose(
        grpo(r + shift, ids, scale_by_std=False), grpo(r, ids, scale_by_std=False), atol=1e-9
    )
    np.testing.assert_allclose(
        grpo(r * scale, ids, scale_by_std=False), scale * grpo(r, ids, scale_by_std=False), atol=1e-9
    )


@st.composite
def turn_batches(draw):
    r, ids = draw(groups())
    lengths = draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)))
    turns = [draw(st.lists(rewards_st, min_size=n, max_size=n)) for n in lengths]
    return turns, ids


@settings(max_examples=60, deadline=None)
@given(turn_batches(), st.sampled_from(["group", "turn_position", "batch"]), st.floats(0, 1))
def test_gtpo_zero_mean_per_normalisation_set(data, scope, gamma):
    turns, ids = data
    adv = gtpo(turns, ids, gamma=gamma, norm_scope=scope)
    flat = np.concatenate(adv)
    tg = np.repeat(ids, [len(t) for t in turns])
    pos = np.concatenate([np.arange(len(t)) for t in turns])
    key = {"group": tg, "turn_position": tg * 10 + pos, "batch": np.zeros_like(tg)}[scope]
    for k in np.unique(key):
        assert abs(flat[key == k].mean()) < 1e-6
    assert [len(a) for a in adv] == [len(t) for t in turns]


@settings(max_examples=60, deadline=None)
@given(groups(), st.integers(1, 4))
def test_gtpo_gamma_one_final_reward_only_reduces_to_grpo(data, n_turns):
    r, ids = data
    turns = [[0.0] * (n_turns - 1) + [x] for x in r]
    per_turn = gtpo(turns, ids, gamma=1.0, norm_scope="turn_position")
    ref = grpo(r, ids)
    for a, g in zip(per_turn, ref, strict=True):
        np.testing.assert_allclose(a, g, atol=1e-9)
    # group scope: same sign and ordering (a positive multiple of the GRPO advantage per group)
    grouped = np.array([a[0] for a in gtpo(turns, ids, gamma=1.0, norm_scope="group")])
    assert np.all(np.sign(np.round(grouped, 9)) == np.sign(np.round(ref, 9)))
    if n_turns == 1:
        np.testing.assert_allclose(grouped, ref, atol=1e-9)


@st.composite
def forests(draw):
    n = draw(st.integers(1, 30))
    parents = [draw(st.integers(-1, i - 1)) if i else -1 for i in range(n)]
    tree_of = []
    for i, p in enumerate(parents):
        tree_of.append(i if p < 0 else tree_of[p])
    rewards = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n))
    return np.array(parents), np.array(rewards), np.array(tree_of)


@settings(max_examples=60, deadline=None)
@given(forests())
def test_mars_all_failed_leaves_give_zero(data):
    parents, _, tree_of = data
    zeros = np.zeros(parents.size)
    assert murphy_returns(parents, zeros).tolist() == zeros.tolist()
    assert murphy(tree_of, parents, zeros).tolist() == zeros.tolist()


@settings(max_examples=60, deadline=None)
@given(forests())
def test_mars_dominates_and_propagates(data):
    parents, r, tree_of = data
    ret = murphy_returns(parents, r)
    assert np.all(ret >= r)
    child = parents >= 0
    assert np.all(ret[parents[child]] >= ret[child])
    mers = murphy_returns(parents, r, mode="mean")
    assert np.all(mers >= r - 1e-12)
    adv = murphy(tree_of, parents, r)
    tree_codes, n_trees = group_codes(tree_of)
    sets, n = sibling_sets(tree_codes, parents, n_trees)
    for s in range(n):
        assert abs(adv[sets == s].mean()) < 1e-6
