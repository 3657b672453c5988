"""The completions viewer (issue 26 item 4): every turn of every trajectory with its prompt, reference, turn
reward and advantage, best first; the page escapes what the model wrote (model output is hostile: no script in
it may run in the MLflow UI)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.completions import completion_rows, completions_html, turn_advantages
from runtime.tableio import write_table
from schemas.params.rewards import AdvantageParams
from schemas.tables import PROBLEMS, TRAJECTORIES
from stages import advantages
from tests.scored_tables import problem, trajectory, turn


def test_turn_advantages_hand_computed():
    assert turn_advantages([0, 1, 1, 0, 0, 1, 0], [0, 2, 4, 0, 0, -1, 0]) == [3.0, -1.0]
    assert turn_advantages([1, 1], [0.5, 1.5]) == [1.0]
    assert turn_advantages([0, 0], [0, 0]) == []


@given(st.lists(st.tuples(st.booleans(), st.floats(-5, 5)), max_size=40))
def test_turn_advantages_one_mean_per_run_of_ones(pairs):
    mask = [int(m) for m, _ in pairs]
    adv = [a for _, a in pairs]
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    out = turn_advantages(mask, adv)
    assert len(out) == runs
    masked = [a for m, a in pairs if m]
    for v in out:
        assert min(masked) - 1e-9 <= v <= max(masked) + 1e-9


def test_every_turn_with_prompt_reference_and_advantage_best_first(tmp_path):
    hostile = "<script>alert(1)</script>"
    rows = [
        trajectory(
            "a",
            "p",
            "g",
            [turn([10, 11], [20], turn_reward=0.0, code="print(2)"), turn([12], turn_reward=1.0)],
            reward=1.0,
        ),
        trajectory("b", "p", "g", [turn([13], turn_reward=-0.1, code=hostile)], reward=0.0),
        trajectory("c", "q", "h", [turn([14], turn_reward=0.5)], reward=0.5),  # c, d tie: dropped
        trajectory("d", "q", "h", [turn([15], turn_reward=0.5)], reward=0.5),
    ]
    write_table(rows, TRAJECTORIES, tmp_path / "t.parquet")
    write_table([problem("p", answer="4"), problem("q", answer="9")], PROBLEMS, tmp_path / "problems.parquet")
    out = advantages.run(
        AdvantageParams(estimator="gtpo"), {"trajectories": str(tmp_path / "t.parquet")}, tmp_path / "o"
    )
    got = completion_rows(str(tmp_path / "t.parquet"), out.uri("samples"), str(tmp_path / "problems.parquet"))
    assert [(r["trajectory_id"], r["turn"]) for r in got] == [
        ("a", 0),
        ("a", 1),
        ("c", 0),
        ("d", 0),
        ("b", 0),
    ]
    first = got[0]
    assert first["prompt"] == "task p" and first["reference"] == "4" and first["code"] == "print(2)"
    assert first["reward"] == 1.0 and first["turn_reward"] == 0.0 and first["stop_reason"] == "answer"
    # the winner's turns are pushed up, the loser's down; the tied group carries none
    assert got[0]["advantage"] > 0 and got[1]["advantage"] > 0 and got[-1]["advantage"] < 0
    assert got[2]["advantage"] is None and got[3]["advantage"] is None
    page = completions_html(got, "iteration 1")
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<tr>") == len(got) + 1 and "5 rows" in page


@pytest.mark.parametrize("reward", [None, 0.0])
def test_unscored_rows_sort_last(tmp_path, reward):
    rows = [
        trajectory("x", "p", "g", [turn([1])], reward=reward),
        trajectory("y", "p", "g", [turn([2])], reward=1.0),
    ]
    write_table(rows, TRAJECTORIES, tmp_path / "t.parquet")
    got = completion_rows(str(tmp_path / "t.parquet"), None, None)
    assert [r["trajectory_id"] for r in got] == ["y", "x"] and got[0]["prompt"] is None
