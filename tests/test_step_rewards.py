"""Verified intermediate steps (``maths.step_rewards``, ``ScoreParams.step_reward``): hand-computed cases,
properties, and what the score and advantages stages do with them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maths.step_rewards import MAX_NUMBERS, reference_steps, step_rewards
from runtime.tableio import read_table, write_table
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.tables import PROBLEMS, SAMPLES, TRAJECTORIES
from stages import advantages, score
from stages.data.synthetic import generate
from tests.scored_tables import problem, trajectory, turn

SAVINGS = (
    "First, find how much she has after saving.\n```python\nprint(4123 + 138 * 6)\n```\n```output\n4951\n```\n"
    "Then subtract the price of the bike.\n```python\nprint(4951 - 158)\n```\n```output\n4793\n```\n"
    "The answer is \\boxed{4793}."
)


def test_reference_steps_are_the_outputs_before_the_last():
    assert reference_steps(SAVINGS) == [4951.0]
    one_step = "Let me evaluate.\n```python\nprint(2 + 3)\n```\n```output\n5\n```\nThe answer is \\boxed{5}."
    assert reference_steps(one_step) == [] and reference_steps(None) == []
    # every shipped two-step tool-arith template has its intermediate value found
    rows = generate("tool-arith", count=40, seed=0, difficulty=5)
    for r in rows:
        steps = reference_steps(r["demonstration"])
        assert len(steps) == r["demonstration"].count("```output") - 1


def test_step_rewards_hand_computed():
    steps = [[4951.0], [4951.0], [4951.0], [4951.0]]
    outputs = [
        "4951", "4951", "4793",  # t0: the step (+0.5); t1: the same value again (nothing); t2: the answer (nothing)
        "4951",  # t3: printed, but the call failed
        " ".join(str(i) for i in range(4945, 4955)),  # t4: 10 numbers: spraying earns nothing
        "4951.0 and 12",  # t5: the value among a few numbers
    ]  # fmt: skip
    statuses = ["ok", "ok", "ok", "error", "ok", "ok"]
    got = step_rewards(steps, outputs, statuses, np.array([3, 1, 1, 1]), 0.5)
    np.testing.assert_allclose(got, [0.5, 0, 0, 0, 0, 0.5])
    assert len(" ".join(str(i) for i in range(4945, 4955)).split()) > MAX_NUMBERS


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 9), max_size=3),  # the trajectory's reference step values
            st.lists(
                st.tuples(st.lists(st.integers(0, 9), max_size=5), st.booleans()), min_size=1, max_size=4
            ),
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([0.25, 1.0]),
)
def test_step_rewards_properties(trajs, bonus):
    steps = [[float(v) for v in s] for s, _ in trajs]
    outputs = [" ".join(map(str, out)) for _, turns in trajs for out, _ in turns]
    statuses = ["ok" if ok else "error" for _, turns in trajs for _, ok in turns]
    lengths = np.array([len(turns) for _, turns in trajs])
    got = step_rewards(steps, outputs, statuses, lengths, bonus)
    assert got.shape == (lengths.sum(),) and (got >= 0).all()
    np.testing.assert_allclose(got / bonus, np.round(got / bonus))  # whole bonuses
    off = np.concatenate([[0], np.cumsum(lengths)])
    for i, (wanted, turns) in enumerate(trajs):
        total = got[off[i] : off[i + 1]].sum()
        assert total <= bonus * len(wanted) + 1e-9  # each reference value at most once
        for j, (out, ok) in enumerate(turns):
            if not ok or len(out) > MAX_NUMBERS or not set(out) & set(wanted):
                assert got[off[i] + j] == 0


def _table(tmp_path):
    write_table(
        [dict(problem("s", "math", answer="4793"), demonstration=SAVINGS)], PROBLEMS, tmp_path / "p.parquet"
    )

    def turns(printed: str) -> list[dict]:
        call = dict(turn([1], [9], code="print(x)"), exec_output=printed)
        answer = dict(turn([2], tool_call="none", exec_status="none"), text="The answer is \\boxed{100}.")
        return [call, answer]

    # both wrong; a computed the intermediate balance in its first turn, b did not
    rows = [trajectory("a", "s", "g", turns("4951")), trajectory("b", "s", "g", turns("17"))]
    for r in rows:
        r["final_answer"] = "100"
    write_table(rows, TRAJECTORIES, tmp_path / "t.parquet")
    return {"trajectories": str(tmp_path / "t.parquet"), "problems": str(tmp_path / "p.parquet")}


@pytest.mark.parametrize("bonus", [0.0, 0.5])
def test_the_score_stage_adds_the_step_to_the_turn_reward_only(tmp_path, bonus):
    out = score.run(ScoreParams(step_reward=bonus, shaping=False), _table(tmp_path), tmp_path / "o")
    rows = {r["trajectory_id"]: r for r in read_table(out.uri("trajectories"), TRAJECTORIES).to_pylist()}
    assert [rows[k]["reward"] for k in "ab"] == [0.0, 0.0]  # the outcome r_i (GRPO's) is untouched
    assert [[t["turn_reward"] for t in rows[k]["turns"]] for k in "ab"] == [[bonus, 0.0], [0.0, 0.0]]
    steps = [dict(rows[k]["reward_components"]).get("steps") for k in "ab"]
    assert steps == ([bonus, 0.0] if bonus else [None, None])
    gtpo = advantages.run(
        AdvantageParams(estimator="gtpo"), {"trajectories": out.uri("trajectories")}, tmp_path / "a"
    )
    samples = {r["sample_id"]: r for r in read_table(gtpo.uri("samples"), SAMPLES).to_pylist()}
    if not bonus:  # both wrong, nothing else differs: no signal at all
        assert samples == {}
    else:  # the step it computed is credited to a's first turn, against b's
        first = {k: samples[k]["advantages"][samples[k]["loss_mask"].index(1)] for k in "ab"}
        assert first["a"] > 0 > first["b"]
