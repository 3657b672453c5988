"""Advantages stage on hand-made scored tables: token layout of samples, zero-signal dropping, MURPHY pruning."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.tableio import read_table, write_table
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.tables import PROBLEMS, SAMPLES, TRAJECTORIES, TREES
from stages import advantages, score
from tests.scored_tables import node, problem, trajectory, tree, turn

S2 = 1 / math.sqrt(2)


def _scored(tmp_path, rows):
    write_table(rows, TRAJECTORIES, tmp_path / "trajectories.parquet")
    return {"trajectories": str(tmp_path / "trajectories.parquet")}


def _samples(out):
    return {r["sample_id"]: r for r in read_table(out.uri("samples"), SAMPLES).to_pylist()}


def _two_groups():
    # group g: a (r 1, turns: completion [10, 11] + obs [20, 21], completion [12]) and b (r 0, one turn [13]);
    # group h: c and d both r 0.5 (no signal)
    return [
        trajectory(
            "a",
            "p",
            "g",
            [turn([10, 11], [20, 21], lp=[-1, -2], turn_reward=0.0), turn([12], lp=[-3], turn_reward=1.0)],
            prompt=[1, 2],
            reward=1.0,
        ),
        trajectory("b", "p", "g", [turn([13], lp=[-4], turn_reward=-0.1)], prompt=[1, 2], reward=0.0),
        trajectory("c", "q", "h", [turn([14], turn_reward=0.5)], prompt=[3], reward=0.5),
        trajectory("d", "q", "h", [turn([15], turn_reward=0.5)], prompt=[3], reward=0.5),
    ]


def test_grpo_samples_token_layout(tmp_path):
    out = advantages.run(AdvantageParams(estimator="grpo"), _scored(tmp_path, _two_groups()), tmp_path / "o")
    s = _samples(out)
    assert sorted(s) == ["a", "b"]  # group h ties: dropped
    a = s["a"]
    assert a["input_ids"] == [1, 2, 10, 11, 20, 21, 12]
    assert a["loss_mask"] == [0, 0, 1, 1, 0, 0, 1]
    # g = (1, 0): deviations ±0.5, sample std √0.5 -> ±1/√2
    np.testing.assert_allclose(a["advantages"], [0, 0, S2, S2, 0, 0, S2], atol=1e-5)
    assert a["rollout_logprobs"] == [0, 0, -1, -2, 0, 0, -3]
    assert (a["algo"], a["group_id"], a["source_id"], a["problem_id"]) == ("grpo", "g", "a", "p")
    np.testing.assert_allclose(s["b"]["advantages"], [0, 0, -S2], atol=1e-5)
    assert out.metrics["adv/zero_signal_frac"] == 0.5 and out.metrics["adv/zero_signal_groups"] == 1
    assert out.metrics["adv/samples"] == 2 and out.metrics["adv/trained_tokens"] == 4
    assert out.metrics["adv/max"] == pytest.approx(S2, abs=1e-5) and out.metrics["adv/mean"] == pytest.approx(
        0
    )


def test_dr_grpo_and_keep_zero_signal(tmp_path):
    params = AdvantageParams(estimator="dr_grpo", keep_zero_signal=True)
    s = _samples(advantages.run(params, _scored(tmp_path, _two_groups()), tmp_path / "o"))
    assert sorted(s) == ["a", "b", "c", "d"]
    assert s["a"]["advantages"] == [0, 0, 0.5, 0.5, 0, 0, 0.5]  # r − mean, no division
    assert s["c"]["advantages"] == [0, 0] and s["c"]["loss_mask"] == [0, 1]


def test_gtpo_per_turn_advantages(tmp_path):
    out = advantages.run(
        AdvantageParams(estimator="gtpo", gamma=0.9), _scored(tmp_path, _two_groups()), tmp_path / "o"
    )
    s = _samples(out)
    # default scope end_aligned: R_a = (0 + 0.9 · 1, 1) = (0.9, 1), R_b = (−0.1,). Last turns {1, −0.1};
    # one turn left {0.9, b idle before its turn: 0.9 · −0.1}: two members each -> ±1/√2, a above b
    np.testing.assert_allclose(s["a"]["advantages"], [0, 0, S2, S2, 0, 0, S2], rtol=1e-5)
    np.testing.assert_allclose(s["b"]["advantages"], [0, 0, -S2], rtol=1e-5)
    assert out.metrics["adv/turn_1/mean"] == pytest.approx(0, abs=1e-6)
    assert out.metrics["adv/turn_2/mean"] == pytest.approx(S2, rel=1e-5)
    # norm_scope group: one set {0.9, 1, −0.1}
    out = advantages.run(
        AdvantageParams(estimator="gtpo", gamma=0.9, norm_scope="group"),
        _scored(tmp_path, _two_groups()),
        tmp_path / "o_group",
    )
    s = _samples(out)
    returns = np.array([0.9, 1.0, -0.1])
    z = (returns - returns.mean()) / (returns.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(s["a"]["advantages"], [0, 0, z[0], z[0], 0, 0, z[1]], rtol=1e-5)
    np.testing.assert_allclose(s["b"]["advantages"], [0, 0, z[2]], rtol=1e-5)
    assert out.metrics["adv/turn_1/mean"] == pytest.approx((z[0] + z[2]) / 2, rel=1e-5)
    assert out.metrics["adv/turn_2/mean"] == pytest.approx(z[1], rel=1e-5)


def test_score_then_advantages_for_math(tmp_path):
    write_table([problem("p", answer="4")], PROBLEMS, tmp_path / "problems.parquet")
    rows = [
        trajectory("r", "p", "g", [turn([5, 6], [7], code="print(2+2)"), turn([8])], final_answer="4"),
        trajectory("w", "p", "g", [turn([9], code="print(2*3)")], final_answer="6"),
    ]
    write_table(rows, TRAJECTORIES, tmp_path / "raw.parquet")
    scored = score.run(
        ScoreParams(),
        {"trajectories": str(tmp_path / "raw.parquet"), "problems": str(tmp_path / "problems.parquet")},
        tmp_path / "score",
    )
    for est in ("grpo", "dr_grpo", "gtpo"):
        out = advantages.run(
            AdvantageParams(estimator=est), {"trajectories": scored.uri("trajectories")}, tmp_path / est
        )
        s = _samples(out)
        assert sorted(s) == ["r", "w"]
        assert min(s["r"]["advantages"][2:]) >= 0 and max(s["w"]["advantages"]) <= 0  # right beats wrong


def _unsolved_group_with_a_format_penalty():
    # g: a right (r 1), b wrong (r 0); h: c and d both wrong (r 0), but d's turn had a format error (-0.1)
    return [
        trajectory("a", "p", "g", [turn([10], turn_reward=1.0)], prompt=[1], reward=1.0),
        trajectory("b", "p", "g", [turn([11], turn_reward=0.0)], prompt=[1], reward=0.0),
        trajectory("c", "q", "h", [turn([12], turn_reward=0.0)], prompt=[2], reward=0.0),
        trajectory("d", "q", "h", [turn([13], turn_reward=-0.1)], prompt=[2], reward=0.0),
    ]


def test_gtpo_signal_from_outcomes_drops_groups_whose_outcomes_tie(tmp_path):
    """GTPO z-scores a format penalty alone into full-size advantages (h: ±1/√2, no answer right); with
    signal_from=outcomes such a group trains nothing, as under GRPO, and the other groups are unchanged."""
    rows = _unsolved_group_with_a_format_penalty()
    both = advantages.run(AdvantageParams(estimator="gtpo"), _scored(tmp_path / "a", rows), tmp_path / "oa")
    s = _samples(both)
    assert sorted(s) == ["a", "b", "c", "d"]
    np.testing.assert_allclose([s["c"]["advantages"][-1], s["d"]["advantages"][-1]], [S2, -S2], atol=1e-5)
    out = advantages.run(
        AdvantageParams(estimator="gtpo", signal_from="outcomes"),
        _scored(tmp_path / "b", rows),
        tmp_path / "ob",
    )
    t = _samples(out)
    assert sorted(t) == ["a", "b"] and out.metrics["adv/zero_signal_groups"] == 1
    for k in "ab":
        assert t[k]["advantages"] == s[k]["advantages"]
    for est in ("grpo", "dr_grpo"):  # outcome-only estimators: the two choices are the same
        x, y = (
            _samples(
                advantages.run(
                    AdvantageParams(estimator=est, signal_from=sf),
                    _scored(tmp_path / est / sf, rows),
                    tmp_path / est / sf / "o",
                )
            )
            for sf in ("advantages", "outcomes")
        )
        assert x == y and sorted(x) == ["a", "b"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0])), min_size=1, max_size=30))
def test_set_outcomes_differ_matches_a_set_of_values(pairs):
    from maths.segments import set_outcomes_differ

    codes = np.array([c for c, _ in pairs])
    values = np.array([v for _, v in pairs])
    got = set_outcomes_differ(values, codes, 5)
    for c in range(5):
        assert got[c] == (len({v for k, v in pairs if k == c}) > 1)


def _tree_rows():
    # T: roots 0 (1/4 pass), 1 (all pass); 0 -> 2 (all pass), 3 (0); 3 -> 4 (0), 5 (0) (tie: no signal)
    # U: roots 0, 1 both all pass (tie: no signal)
    t = [
        node(0, -1, reward=0.25, comp=[10]),
        node(1, -1, reward=1.0, comp=[11]),
        node(2, 0, depth=2, reward=1.0, prompt=[1, 9], comp=[12, 13]),
        node(3, 0, depth=2, reward=0.0, comp=[14]),
        node(4, 3, depth=3, reward=0.0, comp=[15]),
        node(5, 3, depth=3, reward=0.0, comp=[16]),
    ]
    u = [node(0, -1, reward=1.0, comp=[20]), node(1, -1, reward=1.0, comp=[21])]
    return [tree("T", "p", t), tree("U", "q", u)]


def _run_tree(tmp_path, rows, **kw):
    write_table(rows, TREES, tmp_path / "trees.parquet")
    out = advantages.run(
        AdvantageParams(estimator="murphy", **kw), {"trees": str(tmp_path / "trees.parquet")}, tmp_path / "o"
    )
    return out, _samples(out), read_table(out.uri("trees"), TREES).to_pylist()


def test_murphy_stage_returns_pruning_and_samples(tmp_path):
    out, s, trees = _run_tree(tmp_path, _tree_rows())
    nodes = trees[0]["nodes"]
    # MaRS: R5 = R4 = 0, R3 = 0, R2 = 1, R0 = max(0.25, 1, 0) = 1, R1 = 1 -> roots of T tie
    assert [n["ret"] for n in nodes] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [n["pruned"] for n in nodes] == [True, True, False, False, True, True]
    assert [n["pruned"] for n in trees[1]["nodes"]] == [True, True]
    assert sorted(s) == ["T/2", "T/3"]
    assert s["T/2"]["input_ids"] == [1, 9, 12, 13] and s["T/2"]["loss_mask"] == [0, 0, 1, 1]
    assert s["T/2"]["group_id"] == "T/0" and s["T/2"]["rollout_logprobs"] == [0, 0, -0.25, -0.25]
    np.testing.assert_allclose(s["T/2"]["advantages"], [0, 0, S2, S2], atol=1e-5)
    np.testing.assert_allclose(s["T/3"]["advantages"], [0, -S2], atol=1e-5)
    assert out.metrics["adv/pruned_nodes"] == 6 and out.metrics["adv/zero_signal_groups"] == 3
    # MeRS (bounded): R3 = 0 + 1 · mean(0, 0) = 0, R0 = 0.25 + 0.75 · mean(1, 0) = 0.625 (the spec's unbounded
    # formula gave 0.75): now T's roots (0.625, 1) carry signal
    _, s, trees = _run_tree(tmp_path, _tree_rows(), murphy_mode="mean")
    assert [n["ret"] for n in trees[0]["nodes"]][:4] == [0.625, 1.0, 1.0, 0.0]
    assert sorted(s) == ["T/0", "T/1", "T/2", "T/3"]


def test_murphy_bad_trees_name_the_node(tmp_path):
    cyc = [tree("C", "p", [node(0, -1, reward=0.0), node(1, 2, reward=1.0), node(2, 1, reward=0.0)])]
    with pytest.raises(ValueError, match="tree 'C' node 1: .*cycle"):
        _run_tree(tmp_path, cyc)
    missing = [tree("M", "p", [node(0, -1, reward=0.0), node(1, 5, reward=1.0)])]
    with pytest.raises(ValueError, match="tree 'M' node 1: parent 5 is missing"):
        _run_tree(tmp_path, missing)
    unscored = [tree("N", "p", [node(0, -1), node(1, -1)])]
    with pytest.raises(ValueError, match="tree 'N' node 0 has no reward: run the score stage first"):
        _run_tree(tmp_path, unscored)
    assert not (tmp_path / "o" / "samples.parquet").exists()


def test_trajectory_bad_input(tmp_path):
    rows = _two_groups()
    rows[1]["reward"] = None
    with pytest.raises(ValueError, match="trajectory 'b' \\(row 1\\) has no reward"):
        advantages.run(AdvantageParams(), _scored(tmp_path, rows), tmp_path / "o")
    rows = _two_groups()
    rows[0]["turns"][1]["completion_logprobs"] = []
    with pytest.raises(
        ValueError, match="trajectory 'a' turn 1: 1 completion tokens but 0 rollout log-probs"
    ):
        advantages.run(AdvantageParams(), _scored(tmp_path, rows), tmp_path / "o")
    with pytest.raises(ValueError, match="estimator 'murphy' reads 'trees'"):
        advantages.run(AdvantageParams(estimator="murphy"), _scored(tmp_path, _two_groups()), tmp_path / "o")


@st.composite
def random_trees(draw):
    rows = []
    for t in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 8))
        parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
        depth = []
        for p in parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        rewards = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
        rows.append(
            tree(
                f"t{t}",
                "p",
                [
                    node(i, p, depth=d, reward=r, comp=[i + 1])
                    for i, (p, d, r) in enumerate(zip(parents, depth, rewards, strict=True))
                ],
            )
        )
    return rows


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_trees(), st.sampled_from([None, 1, 2]), st.sampled_from([None, 2, 3]))
def test_pruned_nodes_never_reach_the_samples(tmp_path, rows, inter_keep, intra_keep):
    _, s, trees = _run_tree(tmp_path, rows, inter_keep=inter_keep, intra_keep=intra_keep)
    kept = {f"{t['tree_id']}/{n['node_id']}" for t in trees for n in t["nodes"] if not n["pruned"]}
    assert set(s) == kept
    for t in trees:  # every kept node's sibling group carries signal: its returns do not all tie
        for n in t["nodes"]:
            if not n["pruned"]:
                sib = {m["ret"] for m in t["nodes"] if m["parent_id"] == n["parent_id"]}
                assert len(sib) > 1
