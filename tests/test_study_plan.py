"""stages.study without running anything: the cells a study file makes (run ids, seeds, grid, overrides), the
compute check and its tolerance, and the report's numbers on hand-made evaluation tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maths.paired import paired_comparison
from runtime.tableio import write_table
from schemas.tables import EVAL_RESULTS
from stages.study import CellResult, report
from stages.study.plan import StudyError, cells, load, planned_completions

BASE = {"model": "tiny", "iterations": 2, "rollout": {"group_size": 4, "problems_per_iteration": 8}}


def test_cells_run_ids_seeds_and_overrides():
    variant = {"name": "gtpo-g05", "algorithm": "gtpo", "set": {"advantages.gamma": 0.5}}
    data = {"methods": ["grpo", variant], "seeds": [0, 2], "base": BASE, "grid": {"update.lr": [1e-6, 3e-6]}}
    study, name, found = load(data, "mystudy", "runs")
    assert name == "mystudy" and len(found) == 2 * 2 * 2
    assert [c.run_id for c in found[:4]] == [
        "mystudy-grpo-lr1e-06-s0",
        "mystudy-gtpo-g05-lr1e-06-s0",
        "mystudy-grpo-lr1e-06-s2",
        "mystudy-gtpo-g05-lr1e-06-s2",
    ]  # fmt: skip  (seed-major: a study stopped part way has every method of its first seeds)
    for c in found:
        p = c.params
        assert p.run_id == c.run_id and p.run_root == "runs" and p.algorithm == c.algorithm
        assert (
            p.rollout.seed == p.update.seed == c.seed and p.data.seed == p.warmstart.seed == p.eval.seed == 0
        )
        assert p.advantages.gamma == (0.5 if c.method == "gtpo-g05" else 0.9)
        assert p.update.lr == (1e-6 if "lr1e-06" in c.run_id else 3e-6) and c.point.startswith("update.lr=")
    assert load({**data, "name": "other"}, "mystudy", "runs")[1] == "other"


def test_planned_completions_per_rollout_kind():
    study = load({"methods": ["grpo"], "base": BASE}, "s", "runs")[0]
    (grpo,) = cells(study, "s", "runs")
    assert planned_completions(grpo.params) == 8 * 4
    murphy = {
        "name": "m",
        "algorithm": "murphy",
        "set": {"rollout.child_group_size": 2, "rollout.tree_depth": 3},
    }
    study = load({"methods": [murphy], "base": BASE}, "s", "runs")[0]
    (m,) = cells(study, "s", "runs")
    assert planned_completions(m.params) == 8 * 4 * (1 + 2 + 4)


@pytest.mark.parametrize("g, ok", [(4, True), (5, False)])  # 32 vs 40 completions per iteration: +25%
def test_compute_check_and_its_override(g, ok):
    other = {
        "name": "other",
        "algorithm": "grpo",
        "set": {"rollout.group_size": g, "rollout.problems_per_iteration": 8},
    }
    data = {"methods": ["grpo", other], "base": BASE}
    if ok:
        load(data, "s", "runs")
    else:
        with pytest.raises(
            StudyError, match=r"s-grpo-s0 32 completions per iteration, s-other-s0 40 \(\+25%"
        ):
            load(data, "s", "runs")
        load({**data, "allow_compute_mismatch": True}, "s", "runs")
        load({**data, "compute_tolerance": 0.25}, "s", "runs")  # exactly at the tolerance: allowed


def test_total_compute_counts_iterations():
    longer = {"name": "long", "algorithm": "gtpo", "set": {"iterations": 3}}
    with pytest.raises(StudyError, match=r"s-grpo-s0 64 completions in all, s-long-s0 96 \(\+50%"):
        load({"methods": ["grpo", longer], "base": BASE}, "s", "runs")


def test_murphy_batch_budget_is_checked():
    murphy = {"name": "m", "algorithm": "murphy", "set": {"rollout.max_nodes_per_batch": 100}}
    with pytest.raises(StudyError, match="8 trees of up to 20 nodes exceed rollout.max_nodes_per_batch=100"):
        load({"methods": [murphy], "base": BASE}, "s", "runs")


# --- the report on hand-made evaluations ----------------------------------------------------------------------
def _eval(path, solved: list[int]) -> str:
    rows = [
        {"benchmark": "heldout", "problem_id": f"p{i}", "sample_idx": 0, "attempt": 1, "passed": bool(x),
         "score": float(x), "num_turns": 1, "num_tool_calls": 1, "difficulty": None, "completion": "", "feedback": ""}
        for i, x in enumerate(solved)
    ]  # fmt: skip
    return write_table(rows, EVAL_RESULTS, path).uri


START = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
GAINED = [1, 1, 1, 1, 1, 1, 1, 0, 1, 0]  # 7 gained, 1 lost against START


def _cell(tmp_path, method, seed, final, reward=0.5, problems="aaa"):
    d = tmp_path / f"{method}-{seed}"
    return CellResult(
        run_id=f"t-{method}-s{seed}", method=method, algorithm=method, seed=seed, point="", status="completed",
        planned=32, iterations=2,
        metrics={0: {"warmstart/cache_hit": float(seed > 0 or method != "grpo")},
                 1: {"reward/mean": reward, "rollout/tokens": 100.0, "actor/trained_tokens": 80.0},
                 2: {"reward/mean": reward + 0.1 * seed, "rollout/tokens": 110.0, "actor/trained_tokens": 90.0}},
        evals={0: _eval(d / "e0.parquet", START), 2: _eval(d / "e2.parquet", final)},
        completions={1: 32, 2: 32}, problems_sha256=problems, warmstart_sha256="www",
    )  # fmt: skip


def test_report_numbers(tmp_path):
    results = [
        _cell(tmp_path, m, s, GAINED if m == "gtpo" else START) for m in ("grpo", "gtpo") for s in (0, 1)
    ]
    out = report(results, tmp_path / "report", name="t", bootstrap=500, command="turntree study --config x")
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {(r["a"], r["b"], r["scope"]): r for r in data["comparisons"]}
    gtpo = rows[("warm start", "gtpo", "pooled")]
    assert (gtpo["wins"], gtpo["losses"], gtpo["pairs"]) == (14, 2, 20)
    assert gtpo["diff"] == pytest.approx(0.6) and gtpo["p_value"] == pytest.approx(274 / 65536)
    assert rows[("warm start", "gtpo", "seed 1")]["p_value"] == pytest.approx(18 / 256)
    assert rows[("warm start", "grpo", "pooled")]["p_value"] == 1.0  # nothing changed
    assert rows[("grpo", "gtpo", "pooled")]["diff"] == pytest.approx(0.6)
    cell = data["cells"][2]
    assert (cell["warmstart_heldout"], cell["final_heldout"]) == (0.2, 0.8)
    assert (cell["sampled_completions"], cell["generated_tokens"], cell["trained_tokens"]) == (64, 210, 170)
    assert out.metrics["paired/gtpo_vs_warm-start/p_value"] == pytest.approx(274 / 65536)
    assert out.metrics["heldout/gtpo/final_mean"] == pytest.approx(0.8)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| gtpo − warm start | pooled 0, 1 | 20 | +0.600 [" in md and "| 14 / 2 | 0.00418 |" in md
    assert "0.800 (8/10)" in md and "0.50 → 0.60" in md  # held-out final; seed 1's reward per iteration
    assert "trained 1×, reused from the cache 3×" in md and "the same in all 4 cells" in md
    assert (tmp_path / "report" / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    # heldout.jsonl: every evaluation's per-problem scores; the pooled comparison recomputed from it alone
    lines = [json.loads(x) for x in (tmp_path / "report" / "heldout.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and out.tables["heldout"].rows == 8
    by = {(r["method"], r["seed"], r["iteration"]): r["scores"] for r in lines}
    assert by[("gtpo", 1, 2)] == {f"p{i}": float(x) for i, x in enumerate(GAINED)}
    a = np.array([[by[("gtpo", s, 0)][f"p{i}"] for i in range(10)] for s in (0, 1)])
    b = np.array([[by[("gtpo", s, 2)][f"p{i}"] for i in range(10)] for s in (0, 1)])
    again = paired_comparison(a, b, resamples=500, seed=0)
    assert (again["wins"], again["losses"], again["p_value"]) == (
        gtpo["wins"],
        gtpo["losses"],
        gtpo["p_value"],
    )
    assert again["ci_low"] == pytest.approx(gtpo["ci_low"]) and again["diff"] == pytest.approx(gtpo["diff"])


def test_report_flags_cells_that_did_not_share(tmp_path):
    results = [_cell(tmp_path, "grpo", 0, START), _cell(tmp_path, "gtpo", 0, GAINED, problems="bbb")]
    results.append(CellResult("t-gtpo-s1", "gtpo", "gtpo", 1, "", "failed", 32, 2))
    report(results, tmp_path / "r", name="t", bootstrap=100)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "problems table: **differs** between cells" in md and "| failed |" in md
    assert "2 completed" in md


def test_learning_curve_bands():
    from stages.study.plots import reward_curve

    cells_ = [CellResult(f"c{s}", "m", "grpo", s, "", "completed", 1, 2, metrics={1: {"reward/mean": v}})
              for s, v in enumerate([0.2, 0.4, 0.6])]  # fmt: skip
    ks, pts = reward_curve(cells_)
    half = 4.3027 * 0.2 / np.sqrt(3)  # t_{0.975, 2} * s / sqrt(n)
    assert ks == [1] and pts[0] == pytest.approx((0.4, 0.4 - half, 0.4 + half))


# --- the self-correction table (MURPHY's Iter-1..3) on hand-made multi-attempt evaluations ---------------------
def _retry_eval(path, first_pass: list[int], k_max: int = 3) -> str:
    """A problem per entry: solved at that attempt (0: never, after k_max failed attempts)."""
    rows = []
    for i, f in enumerate(first_pass):
        for a in range(1, (f or k_max) + 1):
            rows.append({"benchmark": "heldout", "problem_id": f"p{i}", "sample_idx": 0, "attempt": a,
                         "passed": a == f, "score": float(a == f), "num_turns": 1, "num_tool_calls": 0,
                         "difficulty": None, "completion": "", "feedback": ""})  # fmt: skip
    return write_table(rows, EVAL_RESULTS, path).uri


def test_report_tabulates_pass_at_1_per_self_correction_attempt(tmp_path):
    start = [0, 0, 0, 0, 0, 0, 2, 3, 1, 0]  # Iter-1 0.1, Iter-2 0.2, Iter-3 0.3
    tree = [1, 2, 2, 3, 3, 3, 0, 0, 1, 0]  # 0.2, 0.4, 0.7
    flat = [1, 1, 0, 0, 0, 0, 0, 0, 1, 0]  # 0.3, 0.3, 0.3
    results = []
    for m, fin in (("murphy", tree), ("grpo", flat)):
        d = tmp_path / m
        results.append(CellResult(
            f"t-{m}-s0", m, m, 0, "", "completed", 96, 2,
            evals={0: _retry_eval(d / "e0.parquet", start), 2: _retry_eval(d / "e2.parquet", fin)},
        ))  # fmt: skip
    out = report(results, tmp_path / "r", name="t", bootstrap=200)
    retry = json.loads((tmp_path / "r" / "results.json").read_text())["self_correction"]
    assert retry["iterations"] == 3
    cells_ = {c["method"]: c for c in retry["cells"]}
    assert cells_["murphy"]["warmstart"] == pytest.approx([0.1, 0.2, 0.3])
    assert cells_["murphy"]["final"] == pytest.approx([0.2, 0.4, 0.7])
    assert cells_["grpo"]["final"] == pytest.approx([0.3, 0.3, 0.3])
    rows = {(r["a"], r["b"], r["iteration"]): r for r in retry["comparisons"]}
    # grpo − murphy at Iter-3: murphy alone solves p2..p5, grpo alone none: p = 2 · 1/16
    r3 = rows[("murphy", "grpo", 3)]  # b − a = grpo − murphy
    assert (r3["wins"], r3["losses"], r3["diff"]) == (0, 4, pytest.approx(-0.4))
    assert r3["p_value"] == pytest.approx(2 / 16)
    r1 = rows[("murphy", "grpo", 1)]
    assert (r1["wins"], r1["losses"], r1["diff"]) == (1, 0, pytest.approx(0.1))  # p1 only
    w = rows[("warm start", "murphy", 3)]  # p0..p5 gained, p6, p7 lost
    assert (w["wins"], w["losses"], w["diff"]) == (6, 2, pytest.approx(0.4))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Self-correction: pass@1 at Iter-1..Iter-3" in md
    assert "| `t-murphy-s0` | murphy | 0 | 0.100 | 0.200 | 0.300 | 0.200 | 0.400 | 0.700 |" in md
    assert out.metrics["paired_iter3/grpo_vs_murphy/diff"] == pytest.approx(-0.4)
    lines = [json.loads(x) for x in (tmp_path / "r" / "heldout.jsonl").read_text().splitlines()]
    murphy_final = next(x for x in lines if x["method"] == "murphy" and x["iteration"] == 2)
    assert murphy_final["scores_by_attempt"]["3"] == {f"p{i}": float(f > 0) for i, f in enumerate(tree)}
    assert murphy_final["scores"] == {f"p{i}": float(f == 1) for i, f in enumerate(tree)}


def test_report_without_retries_has_no_self_correction_section(tmp_path):
    results = [_cell(tmp_path, "grpo", 0, START)]
    report(results, tmp_path / "r", name="t", bootstrap=100)
    assert "Self-correction" not in (tmp_path / "r" / "report.md").read_text()
    assert "self_correction" not in json.loads((tmp_path / "r" / "results.json").read_text())
