"""Comparison report: the markdown table has a row per method, PNGs are written and non-trivial, and MLflow
metric histories are read back as curves."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.tableio import write_table
from schemas.tables import EVAL_RESULTS
from stages.compare import compare, markdown_table, method_summaries


def _eval_table(path, solve_prob_by_attempt, problems=12, samples=2, seed=0):
    """A synthetic eval_results table: each sample passes at attempt a with the given probability."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(problems):
        for s in range(samples):
            for a, prob in enumerate(solve_prob_by_attempt, start=1):
                ok = bool(rng.random() < prob)
                rows.append(
                    dict(
                        benchmark="synthetic:func-synth",
                        problem_id=f"p{p}",
                        sample_idx=s,
                        attempt=a,
                        passed=ok,
                        score=float(ok),
                        num_turns=1,
                        num_tool_calls=0,
                        difficulty=None,
                        completion="",
                        feedback="",
                    )
                )
                if ok:
                    break
    return write_table(rows, EVAL_RESULTS, path).uri


@pytest.fixture
def tables(tmp_path):
    return {
        "grpo": _eval_table(tmp_path / "grpo.parquet", [0.2, 0.1, 0.05], seed=1),
        "gtpo": _eval_table(tmp_path / "gtpo.parquet", [0.3, 0.2, 0.1], seed=2),
        "murphy": _eval_table(tmp_path / "murphy.parquet", [0.3, 0.4, 0.4], seed=3),
    }


def test_compare_renders_report_and_plots(tables, tmp_path):
    history = {
        m: {
            "reward/mean": [(s, 0.1 * s + off) for s in range(5)],
            "actor/loss": [(s, 1.0 / (s + 1)) for s in range(5)],
        }
        for m, off in (("grpo", 0.0), ("gtpo", 0.05), ("murphy", 0.1))
    }
    res = compare(tables, tmp_path / "report", history, bootstrap=200)
    md = (tmp_path / "report" / "report.md").read_text()
    main_table = md.split("## Paired differences")[0]
    body = [ln for ln in main_table.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert sorted(ln.split("|")[1].strip() for ln in body) == ["grpo", "gtpo", "murphy"]
    assert "Iter-3 pass@1" in md and "pass_at_1_vs_iteration.png" in md and "reward_curves.png" in md
    for name in ("pass_vs_iteration", "reward_curves"):
        png = tmp_path / "report" / res.tables[name].uri.rsplit("/", 1)[1]
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert res.tables["report"].rows == 3
    # headline metrics per method; Iter-k is non-decreasing in k
    for m in ("grpo", "gtpo", "murphy"):
        ys = [res.metrics[f"eval/synthetic-func-synth/{m}/pass_at_1_attempt{k}"] for k in (1, 2, 3)]
        assert ys == sorted(ys)


def test_compare_without_curves_and_cells(tables, tmp_path):
    res = compare({"grpo": tables["grpo"]}, tmp_path / "r", None, bootstrap=0)
    assert "reward_curves" not in res.tables
    summaries = method_summaries({"grpo": tables["grpo"]}, bootstrap=0)
    md = markdown_table(summaries)
    m = summaries["grpo"]["synthetic:func-synth"]
    assert f"{m['pass_at_1_attempt1']:.3f}" in md
    with pytest.raises(ValueError, match="at least one"):
        compare({}, tmp_path / "r2")


def test_metric_histories_from_mlflow(tmp_path):
    from mlflow import MlflowClient

    from stages.compare import metric_histories

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_ids = {}
    for method in ("grpo", "murphy"):
        run = client.create_run(exp)
        for step in range(3):
            client.log_metric(run.info.run_id, "reward/mean", 0.1 * step, step=step)
        run_ids[method] = run.info.run_id
    hist = metric_histories(run_ids, ["reward/mean", "actor/loss"], tracking_uri=uri)
    assert hist["grpo"]["reward/mean"] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert "actor/loss" not in hist["murphy"]  # never logged: left out
    with pytest.raises(ValueError, match="method 'x'"):
        metric_histories({"x": "0" * 32}, tracking_uri=uri)


def test_compare_reports_paired_differences_against_the_first_method(tables, tmp_path):
    """Each method against the first on the same problems: the observed difference of per-problem pass@1 sits
    inside its paired CI, and a method that solves more at Iter-3 has a positive difference."""
    res = compare(tables, tmp_path / "paired", None, bootstrap=300)
    md = (tmp_path / "paired" / "report.md").read_text()
    assert "## Paired differences against `grpo`" in md
    paired = md.split("## Paired differences")[1]
    assert [
        ln.split("|")[1].strip() for ln in paired.splitlines() if ln.startswith("| ") and "method" not in ln
    ] == [
        "gtpo",
        "murphy",
    ]
    for m in ("gtpo", "murphy"):
        for it in (1, 3):
            key = f"eval/synthetic-func-synth/{m}_vs_grpo/diff_attempt{it}"
            assert res.metrics[f"{key}_ci_low"] <= res.metrics[key] <= res.metrics[f"{key}_ci_high"]
    want = (
        res.metrics["eval/synthetic-func-synth/murphy/pass_at_1_attempt3"]
        - res.metrics["eval/synthetic-func-synth/grpo/pass_at_1_attempt3"]
    )
    assert res.metrics["eval/synthetic-func-synth/murphy_vs_grpo/diff_attempt3"] == pytest.approx(want)
    assert want > 0
