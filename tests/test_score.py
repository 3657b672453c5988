"""Score stage on small hand-made tables: math and code trajectories (real sandbox), MURPHY trees."""

from __future__ import annotations

import numpy as np
import pytest

from maths.similarity import similarity
from runtime.tableio import read_table, write_table
from schemas.params.rewards import ScoreParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES
from stages import score
from tests.scored_tables import node, problem, trajectory, tree, turn

ADD_TESTS = [
    "assert add(1, 2) == 3",
    "assert add(0, 0) == 0",
    "assert add(2, 2) == 4",
    "assert add(-1, 1) == 0",
]


def _write(tmp_path, problems, rows, schema=TRAJECTORIES, name="trajectories"):
    write_table(problems, PROBLEMS, tmp_path / "problems.parquet")
    write_table(rows, schema, tmp_path / f"{name}.parquet")
    return {name: str(tmp_path / f"{name}.parquet"), "problems": str(tmp_path / "problems.parquet")}


def _by_id(uri):
    return {r["trajectory_id"]: r for r in read_table(uri, TRAJECTORIES).to_pylist()}


def test_math_trajectories(tmp_path):
    inputs = _write(
        tmp_path,
        [problem("p1", answer="72"), problem("p2", answer="\\frac{1}{2}")],
        [
            trajectory(
                "a", "p1", "g1", [turn([10, 11], [20], code="print(8*9)"), turn([12])], final_answer="72"
            ),
            trajectory(
                "b",
                "p1",
                "g1",
                [turn([13], tool_call="none"), turn([14], tool_call="invalid", code="y = (")],
                final_answer="70",
            ),
            trajectory("c", "p1", "g1", [turn([15], code="print(8*9)")], final_answer="72.0"),
            trajectory("d", "p2", "g2", [turn([16], code="1/2")], final_answer="0.5"),
            trajectory("e", "p2", "g2", [turn([17], code="1/3")], final_answer="1/3"),
            trajectory(
                "f", "p2", "g2", [turn([18], tool_call="invalid", code="1/")], final_answer="$\\dfrac{1}{2}$"
            ),
        ],
    )
    out = score.run(ScoreParams(), inputs, tmp_path / "score")
    rows = _by_id(out.uri("trajectories"))
    assert {k: r["correct"] for k, r in rows.items()} == dict(
        a=True, b=False, c=True, d=True, e=False, f=True
    )
    # GRPO r_i: correct and no invalid tool call (format gate): f is right but made an invalid call
    assert {k: r["reward"] for k, r in rows.items()} == dict(a=1.0, b=0.0, c=1.0, d=1.0, e=0.0, f=0.0)
    # GTPO turn rewards: a = (0, 1); c = (1,); f = (−0.1 + 1,)
    assert [t["turn_reward"] for t in rows["a"]["turns"]] == [0.0, 1.0]
    assert rows["f"]["turns"][0]["turn_reward"] == pytest.approx(0.9)
    # b failed with successes a, c: shaped = 0.5 · mean(sim(b, a), sim(b, c)); turn 1 no call, turn 2 invalid
    shaped = 0.5 * (similarity("y = (", "print(8*9)") + similarity("y = (", "print(8*9)")) / 2
    assert [t["turn_reward"] for t in rows["b"]["turns"]] == pytest.approx([-0.1, -0.1 + shaped])
    # e failed; its group has successes d and f: codes "1/3" vs "1/2" and "1/"
    shaped_e = 0.5 * (similarity("1/3", "1/2") + similarity("1/3", "1/")) / 2
    assert rows["e"]["turns"][0]["turn_reward"] == pytest.approx(shaped_e)
    comps = dict(rows["b"]["reward_components"])
    assert comps["math_answer"] == 0.0 and comps["format"] == pytest.approx(-0.2)
    assert comps["shaped"] == pytest.approx(shaped)
    assert out.metrics["reward/correct_frac"] == pytest.approx(4 / 6)
    assert out.metrics["reward/math_answer/mean"] == pytest.approx(4 / 6)
    assert out.metrics["reward/format_error_frac"] == pytest.approx(2 / 6)

    plain = score.run(ScoreParams(shaping=False, format_gate=False), inputs, tmp_path / "plain")
    rows = _by_id(plain.uri("trajectories"))
    assert rows["f"]["reward"] == 1.0 and rows["b"]["turns"][1]["turn_reward"] == pytest.approx(-0.1)


def test_code_trajectories_run_the_final_program_in_the_sandbox(tmp_path):
    import runtime.sandbox  # noqa: F401  (the real sandbox: an ImportError fails here, nothing is mocked)

    right = "def add(a, b):\n    return a + b\n"
    half = "def add(a, b):\n    return a + b if a > 0 else 5\n"  # passes add(1, 2) and add(2, 2) only
    inputs = _write(
        tmp_path,
        [problem("add", "code", tests=ADD_TESTS, entry_point="add")],
        [
            trajectory(
                "r", "add", "g", [turn([1], code="print(1)"), turn([2], code=right)], final_answer=right
            ),
            trajectory("h", "add", "g", [turn([3], code=half)], final_answer=None),  # last turn's code
            trajectory(
                "w", "add", "g", [turn([4], tool_call="none")], final_answer="def add(a, b): return 7"
            ),
        ],
    )
    out = score.run(ScoreParams(shaping=False), inputs, tmp_path / "score")
    rows = _by_id(out.uri("trajectories"))
    assert dict(rows["r"]["reward_components"])["tests_fraction"] == 1.0 and rows["r"]["correct"]
    assert rows["h"]["reward"] == pytest.approx(0.5) and not rows["h"]["correct"]
    assert rows["w"]["reward"] == 0.0
    binary = score.run(ScoreParams(code_reward="binary", shaping=False), inputs, tmp_path / "binary")
    assert [r["reward"] for r in _by_id(binary.uri("trajectories")).values()] == [1.0, 0.0, 0.0]


def test_trees_use_stored_counts_and_rerun_missing_ones(tmp_path):
    import runtime.sandbox  # noqa: F401  (re-running missing counts needs the real sandbox)

    nodes = [
        node(0, -1, passed=1, total=4),
        node(1, -1, passed=4, total=4),
        node(2, 0, depth=2, code="def add(a, b):\n    return a + b\n"),  # counts missing: re-run
        node(3, 0, depth=2, passed=0, total=4),
    ]
    inputs = _write(
        tmp_path,
        [problem("add", "code", tests=ADD_TESTS, entry_point="add")],
        [tree("T", "add", nodes)],
        TREES,
        "trees",
    )
    out = score.run(ScoreParams(), inputs, tmp_path / "score")
    got = read_table(out.uri("trees"), TREES).to_pylist()[0]["nodes"]
    assert [n["reward"] for n in got] == [0.25, 1.0, 1.0, 0.0]
    assert (got[2]["tests_passed"], got[2]["tests_total"]) == (4, 4)
    assert out.metrics["reward/rerun_nodes"] == 1.0
    assert out.metrics["reward/depth_2/pass_frac"] == 0.5
    binary = score.run(ScoreParams(code_reward="binary"), inputs, tmp_path / "binary")
    assert [n["reward"] for n in read_table(binary.uri("trees"), TREES).to_pylist()[0]["nodes"]] == [
        0,
        1,
        1,
        0,
    ]


def test_bad_inputs(tmp_path):
    inputs = _write(
        tmp_path, [problem("p1", answer="1")], [trajectory("x", "nope", "g", [turn([1])], final_answer="1")]
    )
    with pytest.raises(
        ValueError, match="trajectory 'x' \\(row 0\\): problem 'nope' is not in the problems table"
    ):
        score.run(ScoreParams(), inputs, tmp_path / "o1")
    with pytest.raises(ValueError, match="exactly one of \\['trajectories', 'trees'\\]"):
        score.run(ScoreParams(), {"problems": inputs["problems"]}, tmp_path / "o2")
    inputs = _write(tmp_path, [problem("p1", answer="1")], [trajectory("y", "p1", "g", [], final_answer="1")])
    with pytest.raises(ValueError, match="trajectory 'y' \\(row 0\\) has no turns"):
        score.run(ScoreParams(), inputs, tmp_path / "o3")
    assert not (tmp_path / "o3" / "trajectories.parquet").exists()


def test_stored_reward_columns_are_float_arrays(tmp_path):
    inputs = _write(
        tmp_path,
        [problem("p1", answer="2")],
        [trajectory(f"t{i}", "p1", "g", [turn([i])], final_answer=str(i)) for i in range(4)],
    )
    out = score.run(ScoreParams(), inputs, tmp_path / "s")
    table = read_table(out.uri("trajectories"), TRAJECTORIES)
    np.testing.assert_array_equal(table["reward"].to_numpy(), [0, 0, 1, 0])
    assert out.tables["trajectories"].rows == 4


def test_lenient_math_reward_scores_an_unboxed_last_number(tmp_path):
    """math_answer_lenient: with no boxed answer, the last number of the last turn is the answer; the row is
    then correct too. The default math_answer still wants the box."""
    texts = {"a": "7 + 5 = 12", "b": "It is 12 or 13", "c": "\\boxed{12}", "d": "no idea"}
    rows = []
    for tid, text in texts.items():
        t = turn([10, 11])
        t["text"] = text
        rows.append(trajectory(tid, "p", "g", [t], final_answer="12" if tid == "c" else None))
    inputs = _write(tmp_path, [problem("p", answer="12")], rows)
    params = dict(shaping=False, format_gate=False)
    lenient = score.run(
        ScoreParams(reward_weights={"math_answer_lenient": 1.0}, **params), inputs, tmp_path / "l"
    )
    strict = score.run(ScoreParams(**params), inputs, tmp_path / "s")
    got = {k: (r["reward"], r["correct"]) for k, r in _by_id(lenient.uri("trajectories")).items()}
    assert got == {"a": (1.0, True), "b": (0.0, False), "c": (1.0, True), "d": (0.0, False)}
    assert [r["reward"] for r in _by_id(strict.uri("trajectories")).values()] == [0.0, 0.0, 1.0, 0.0]
