"""Issue 13 item 3: uid slots that cannot collide across processes, degenerate programs that get a verdict
(never an exception), and a sandbox failure that never becomes a reward (score retries, then marks the job;
advantages leaves it out of its group). Real sandbox, real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from runtime.sandbox import execute, execute_many, run_tests, run_tests_many
from runtime.sandbox import execution as execution_module
from runtime.sandbox import isolation as iso
from runtime.sandbox.grading import plan_tests
from runtime.tableio import read_table, write_table
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.tables import PROBLEMS, SAMPLES, TRAJECTORIES, TREES
from stages import advantages, score
from tests.scored_tables import node, problem, trajectory, tree, turn

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="uid slots exist only when running as root")

# ---------------------------------------------------------------- uid slots across processes
HOLDER = """
import sys, time
from runtime.sandbox.isolation import UidSlot
slot = UidSlot()
print(slot.uid, flush=True)
sys.stdin.read()  # hold the slot until the test closes our stdin
"""


def _env(tmpdir: Path) -> dict:
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@needs_root
def test_lock_dir_is_machine_wide_and_private():
    where = iso.lock_dir()
    assert not str(where).startswith(tempfile.gettempdir() + "/") and where in iso.LOCK_DIRS
    st = os.lstat(where)
    assert st.st_uid == 0 and not st.st_mode & 0o022


@needs_root
def test_a_slot_held_by_another_process_with_another_tmpdir_is_never_taken(tmp_path):
    other_tmp = tmp_path / "other-tmp"
    other_tmp.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(other_tmp),
        text=True,
    )  # fmt: skip
    try:
        held = int(holder.stdout.readline())
        ours = [iso.UidSlot() for _ in range(4)]
        try:
            assert held not in [s.uid for s in ours]
        finally:
            for s in ours:
                s.release()
        assert holder.poll() is None  # nothing of ours touched it
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_released_slot_launches_nothing():
    slot = iso.UidSlot()
    slot.release()
    raw = iso.launch({"mode": "exec", "code": "print(1)"}, limits=iso.Limits(), slot=slot)
    assert raw.error == "launch failed: uid slot released" and raw.stdout == b""


WORKER = """
import json, sys
from runtime.sandbox import SandboxPool, run_tests_many
tag, rounds, per_round = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
right = wrong = errors = 0
for r in range(rounds):  # a fresh pool each round: slots acquired and released while the other runs
    pool = SandboxPool(2)
    ks = range(r * per_round, (r + 1) * per_round)
    programs = [f"def f(x):\\n    return x * {tag} + {k}" + (" + 1" if k % 10 == 9 else "") for k in ks]
    tests = [[f"assert f({k}) == {k * tag + k}"] for k in ks]
    for k, rep in zip(ks, run_tests_many(programs, tests, pool=pool)):
        errors += rep.execution.error is not None
        right += rep.passed == (0 if k % 10 == 9 else 1)
        wrong += rep.passed != (0 if k % 10 == 9 else 1)
    pool.close()
print(json.dumps({"right": right, "wrong": wrong, "errors": errors}))
"""


@needs_root
def test_two_processes_with_different_tmpdirs_grade_200_jobs_each_correctly(tmp_path):
    procs = []
    for tag in (3, 5):
        tmpdir = tmp_path / f"tmp{tag}"
        tmpdir.mkdir()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(tag), "4", "50"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_env(tmpdir),
                text=True,
            )  # fmt: skip
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results == [{"right": 200, "wrong": 0, "errors": 0}] * 2


# ---------------------------------------------------------------- degenerate programs
DEGENERATE = {
    "1+ x 10**6": "1+" * 10**6,
    "deep recursion in the parser": "1+" * 10**5 + "1",
    "nested parentheses": "(" * 10**5 + ")" * 10**5,
    "nested brackets": "x = " + "[" * 10**4 + "]" * 10**4 + "\ndef f(a):\n    return a\n",
    "null byte": "def f(a):\n    return a\n\0",
}


@pytest.mark.parametrize("program", list(DEGENERATE.values()), ids=list(DEGENERATE))
def test_degenerate_programs_get_a_failing_verdict_not_an_exception(program):
    plan_tests(program, ["assert f(1) == 1"])  # the parent's planning never raises on the program
    report = run_tests(program, ["assert f(1) == 1"])
    assert (report.passed, report.total) == (0, 1) and not report.sandbox_failed
    assert report.results[0].message.startswith("program failed to load")
    result = execute(program)
    assert result.returncode == 1 and result.error is None and not result.ok


def test_degenerate_programs_in_a_batch_fail_alone():
    programs = [*DEGENERATE.values(), "def f(a):\n    return a\n"]
    reports = run_tests_many(programs, [["assert f(1) == 1"]] * len(programs))
    assert [r.passed for r in reports] == [0] * len(DEGENERATE) + [1]
    assert not any(r.sandbox_failed for r in reports)
    assert [r.returncode for r in execute_many(programs)] == [1] * len(DEGENERATE) + [0]


# ---------------------------------------------------------------- a sandbox failure is never a reward
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return 7\n"


@pytest.fixture
def broken_sandbox(monkeypatch):
    """Launches of programs containing "#ALWAYS" always fail, of "#ONCE" fail the first time only."""
    real, calls = execution_module.launch, []

    def launch(job, **kw):
        code = job["code"]
        calls.append(code)
        if "#ALWAYS" in code or ("#ONCE" in code and calls.count(code) == 1):
            return iso.RawRun(
                b"", b"", b"", None, False, False, 0.0, "bwrap", "sandbox worker died (restarted)"
            )
        return real(job, **kw)

    monkeypatch.setattr(execution_module, "launch", launch)
    return calls


def _inputs(tmp_path, rows, schema=TRAJECTORIES, name="trajectories"):
    write_table(
        [problem("add", "code", tests=ADD_TESTS, entry_point="add")], PROBLEMS, tmp_path / "p.parquet"
    )
    write_table(rows, schema, tmp_path / f"{name}.parquet")
    return {name: str(tmp_path / f"{name}.parquet"), "problems": str(tmp_path / "p.parquet")}


def _traj(tid, gid, program):
    return trajectory(tid, "add", gid, [turn([len(tid)], code=program)], final_answer=program)


def _advantages(uri, tmp_path, name):
    out = advantages.run(AdvantageParams(estimator="grpo"), {"trajectories": uri}, tmp_path / name)
    rows = read_table(out.uri("samples"), SAMPLES).to_pylist()
    return out, {r["sample_id"]: max(r["advantages"], key=abs) for r in rows}


def test_a_sandbox_failure_is_retried_then_marked_and_left_out_of_its_group(tmp_path, broken_sandbox):
    rows = [
        _traj("a", "g", RIGHT),
        _traj("b", "g", WRONG),
        _traj("c", "g", RIGHT + "#ONCE\n"),  # fails once, the retry grades it: a normal verdict
        _traj("x", "g", WRONG + "#ALWAYS\n"),  # fails twice: no verdict
        _traj("d", "h", RIGHT),
        _traj("e", "h", WRONG),
    ]
    out = score.run(ScoreParams(shaping=False), _inputs(tmp_path / "s", rows), tmp_path / "score")
    assert (
        broken_sandbox.count(rows[3]["final_answer"]) == 2
        and broken_sandbox.count(rows[2]["final_answer"]) == 2
    )
    assert broken_sandbox.count(RIGHT) == 2  # a and d: graded once each
    scored = {r["trajectory_id"]: r for r in read_table(out.uri("trajectories"), TRAJECTORIES).to_pylist()}
    assert [scored[t]["no_verdict"] for t in "abcdex"] == [False] * 5 + [True]  # the one place that says it
    assert all("sandbox_error" not in dict(scored[t]["reward_components"]) for t in "abcdex")
    assert [scored[t]["reward"] for t in "abcde"] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert out.metrics["reward/sandbox_error_frac"] == pytest.approx(1 / 6)
    assert out.metrics["reward/sandbox_errors"] == 1.0
    assert out.metrics["reward/mean"] == pytest.approx(3 / 5)  # over the five rows with a verdict
    assert any("sandbox failed twice" in n for n in out.notes)

    adv_out, adv = _advantages(out.uri("trajectories"), tmp_path, "adv")
    assert "x" not in adv and adv_out.metrics["adv/sandbox_error_dropped"] == 1.0
    # the rest of the group trains exactly as if x had never been sampled
    alone = [
        r for r in read_table(out.uri("trajectories"), TRAJECTORIES).to_pylist() if r["trajectory_id"] != "x"
    ]
    write_table(alone, TRAJECTORIES, tmp_path / "alone.parquet")
    _, expected = _advantages(str(tmp_path / "alone.parquet"), tmp_path, "alone")
    assert adv.keys() == expected.keys() == set("abcde")
    np.testing.assert_allclose([adv[k] for k in "abcde"], [expected[k] for k in "abcde"])
    assert adv["b"] < 0 < adv["a"]  # a reward of 0 for x would have shifted the group mean


def test_every_trajectory_without_a_verdict_is_a_clear_error(tmp_path, broken_sandbox):
    rows = [_traj("x", "g", RIGHT + "#ALWAYS\n"), _traj("y", "g", WRONG + "#ALWAYS\n")]
    out = score.run(ScoreParams(shaping=False), _inputs(tmp_path, rows), tmp_path / "score")
    assert out.metrics["reward/sandbox_error_frac"] == 1.0
    with pytest.raises(ValueError, match="no trajectory has a verdict"):
        advantages.run(AdvantageParams(), {"trajectories": out.uri("trajectories")}, tmp_path / "adv")


def test_a_tree_node_without_a_verdict_has_no_reward_and_its_tree_is_left_out(tmp_path, broken_sandbox):
    def t(tid, second):  # two roots: one stored 4/4, one re-run in the sandbox
        return tree(tid, "add", [node(0, -1, passed=2, total=2), node(1, -1, code=second)])

    rows = [t("T", WRONG), t("U", RIGHT + "#ALWAYS\n")]
    out = score.run(ScoreParams(), _inputs(tmp_path, rows, TREES, "trees"), tmp_path / "score")
    scored = read_table(out.uri("trees"), TREES).to_pylist()
    assert [n["reward"] for n in scored[0]["nodes"]] == [1.0, 0.0]
    bad = scored[1]["nodes"][1]
    assert (bad["reward"], bad["tests_passed"], bad["tests_total"], bad["no_verdict"]) == (
        None,
        None,
        None,
        True,
    )
    assert [n["no_verdict"] for n in scored[0]["nodes"]] == [False, False] and not bad["pruned"]
    assert out.metrics["reward/sandbox_errors"] == 1.0 and out.metrics["reward/mean"] == pytest.approx(2 / 3)

    adv = advantages.run(AdvantageParams(estimator="murphy"), {"trees": out.uri("trees")}, tmp_path / "adv")
    samples = {r["sample_id"] for r in read_table(adv.uri("samples"), SAMPLES).to_pylist()}
    assert samples == {"T/0", "T/1"} and adv.metrics["adv/sandbox_error_trees_dropped"] == 1.0
    trees = read_table(adv.uri("trees"), TREES).to_pylist()
    assert [n["pruned"] for n in trees[1]["nodes"]] == [True, True]
    assert [n["ret"] for n in trees[1]["nodes"]] == [None, None]
    assert [n["ret"] for n in trees[0]["nodes"]] == [1.0, 0.0]


def test_an_evaluation_attempt_without_a_verdict_is_marked_and_counted_as_not_passed(
    tmp_path, broken_sandbox, tiny_model
):
    """evaluate writes the same column: an attempt the sandbox failed on twice is no_verdict, not passed, and
    named in the stage's notes and metrics; the other problem's attempts are graded as usual."""
    from transformers import AutoTokenizer

    from schemas.params.evaluate import EvalParams
    from schemas.tables import EVAL_RESULTS
    from stages import evaluate
    from tests.test_evaluate import ScriptedEngine

    rows = [
        {**problem(pid, "code", tests=ADD_TESTS, entry_point="add"), "split": "eval"} for pid in ("good", "broken")
    ]
    programs = {"good": RIGHT, "broken": RIGHT + "#ALWAYS\n"}
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model), rows, lambda p, a: programs[p["problem_id"]])
    uri = write_table(rows, PROBLEMS, tmp_path / "problems.parquet").uri
    params = EvalParams(max_problems=None, bootstrap=50, iterations=1, samples=2, temperature=1.0)
    out = evaluate.run(params, {"problems": uri}, tmp_path / "eval", engine=engine)
    table = read_table(out.uri("eval_results"), EVAL_RESULTS).to_pylist()
    got = sorted((r["problem_id"], r["passed"], r["no_verdict"]) for r in table)
    assert got == [("broken", False, True)] * 2 + [("good", True, False)] * 2
    assert broken_sandbox.count(programs["broken"].strip()) == 4  # each of the 2 samples tried twice
    assert out.metrics["eval/synthetic-test/sandbox_errors"] == 2.0
    assert any("2 attempt(s) got no verdict" in n for n in out.notes)
