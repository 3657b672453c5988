"""What `turntree` prints: progress lines without a terminal, the end-of-run story read from a manifest,
`--version`, `params`, `runs`, and a whole quiet `turntree run` on the tiny model."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.console import LineProgress, before_after, headline, iteration_metrics, links, run_story

REPO = Path(__file__).resolve().parents[1]


def _eval(acc: float, low: float, high: float) -> dict[str, float]:
    b = "eval/synthetic-tool-arith"
    return {
        f"{b}/accuracy": acc,
        f"{b}/accuracy_ci_low": low,
        f"{b}/accuracy_ci_high": high,
        f"{b}/problems": 4.0,
        f"{b}/samples_per_problem": 1.0,
        "timing/evaluate": 2.0,
    }


def _manifest() -> dict:
    def rec(metrics: dict) -> dict:
        return {"current": "v2", "versions": {"v1": {}, "v2": {"output": {"metrics": metrics}}}}

    return {
        "run_id": "gtpo-abc",
        "status": "completed",
        "params": {"algorithm": "gtpo"},
        "final_checkpoint": "/r/gtpo-abc/iter-2/update/v1/checkpoint",
        "prefect_flow_run_id": "fr-1",
        "mlflow_run_id": "ml-1",
        "stages": {
            "data": rec({"data/problems": 10.0}),
            "iter-0/evaluate": rec(_eval(0.25, 0.0, 0.75)),
            "iter-1/rollout": rec({"rollout/tool_calls_per_trajectory": 1.5, "timing/rollout": 12.0}),
            "iter-1/score": rec({"reward/mean": 0.2, "reward/correct_frac": 0.25, "timing/score": 1.0}),
            "iter-2/score": rec({"reward/mean": 0.6, "reward/correct_frac": 0.5, "timing/score": 1.0}),
            "iter-2/evaluate": rec(_eval(0.75, 0.25, 1.0)),
        },
    }


def test_line_progress_prints_only_long_stages_every_few_seconds():
    now = [0.0]
    out = io.StringIO()
    hook = LineProgress(out, every=5.0, clock=lambda: now[0])
    hook("score", 0, 2, "")
    now[0] = 1.0
    hook("score", 2, 2, "")  # quick stage: silent
    for t, done in ((10.0, 0), (12.0, 1), (16.0, 2), (18.0, 3), (22.0, 4)):
        now[0] = t
        hook("update", done, 4, "loss 0.1")
    lines = out.getvalue().splitlines()
    assert lines == ["  update: 2/4 loss 0.1 (6s, ~6s left)", "  update: done 4/4 loss 0.1 in 12s"]


def test_line_progress_shows_a_stage_that_reports_rarely_every_period():
    """A pipe or a log file sees each long stage every ``every`` seconds, before its first report too (an update
    reports once per optimizer step, a minute apart on a CPU), and when it ends; a quick one stays silent."""
    now = [0.0]
    out = io.StringIO()
    hook = LineProgress(out, every=30.0, clock=lambda: now[0])
    hook.begin("score")
    now[0] = 2.0
    hook.tick()
    hook.end("score")
    now[0] = 10.0
    hook.begin("update")
    for t in (39.0, 41.0, 55.0, 72.0):
        now[0] = t
        hook.tick()
    hook("update", 1, 2, "loss 0.5")
    now[0] = 105.0
    hook.tick()
    hook.end("update")
    hook.end("update")  # ended twice (a report said done, then the flow): one line
    assert out.getvalue().splitlines() == [
        "  update: running (31s)",
        "  update: running (62s)",
        "  update: 1/2 loss 0.5 (95s, ~95s left)",
        "  update: done in 95s",
    ]


def test_story_table_before_after_and_links(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("TURNTREE_MLFLOW_UI", raising=False)
    m = _manifest()
    per_iter = iteration_metrics(m)
    assert sorted(per_iter) == [0, 1, 2] and per_iter[2]["seconds/evaluate"] == 2.0
    assert headline(per_iter[1]) is None and headline(per_iter[2])["value"] == 0.75
    assert before_after(per_iter) == (
        "held-out accuracy on synthetic-tool-arith (4 problems): starting policy 0.25 (1/4) -> iteration 2 "
        "0.75 (3/4) (+0.50)"
    )
    story = run_story(m, "7", "/r").splitlines()
    header = next(line for line in story if line.startswith("iter"))
    assert header.split()[:4] == ["iter", "reward", "correct", "tool"] and "rollout s" in header
    row2 = next(line for line in story if line.startswith("2 "))
    assert "0.600" in row2 and "0.75 (3/4) [0.25, 1.00]" in row2
    assert any("1.50" in line for line in story if line.startswith("1 "))
    text = "\n".join(story)
    assert (
        "http://127.0.0.1:5000/#/experiments/7/runs/ml-1?workflowType=machine_learning" in text
        and "4200 (after" not in text
    )
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4300/api")
    assert links(m, "7", "/r")[0] == "Prefect: http://127.0.0.1:4300/runs/flow-run/fr-1"


def test_version_and_params(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("turntree 0.")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout:\n  group_size: 2\n")
    assert main(["params", "--config", str(cfg), "--set", "algorithm=murphy"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert 'algorithm: "murphy"  # grpo: outcome reward; gtpo: turn-level TIR; murphy: feedback trees' in out
    assert "  group_size: 2  # G: samples per problem (roots per tree)" in out
    assert '  kind: "trees"' in "\n".join(out)  # resolved: the algorithm picked the rollout kind
    assert main(["params", "--set", "rollout.group_sz=3"]) == 2


def test_runs_shows_key_metrics(tmp_path, capsys):
    from flows.runstore import RunStore

    store = RunStore(str(tmp_path), "gtpo-abc")
    store.create_or_open({"algorithm": "gtpo"})
    store.update(stages=_manifest()["stages"])
    assert main(["runs", "--root", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gtpo-abc"))
    assert row.split()[3:6] == ["2", "0.600", "0.75"]


@pytest.mark.slow
def test_quiet_run_tells_its_story(tiny_model, tmp_path):
    """A default (quiet) `turntree run` of the tiny pipeline, piped: no library chatter, a progress line per long
    stage every TURNTREE_PROGRESS_EVERY seconds (30 by default), the table and the links."""
    from schemas.params.presets import tiny_pipeline

    body = tiny_pipeline(str(tiny_model), str(tmp_path / "runs"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(body))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TURNTREE_PROGRESS_EVERY": "2"}
    env.pop("PREFECT_API_URL", None)
    res = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    progress = [line for line in res.stderr.splitlines() if re.match(r"  \w+: (running|done|\d+/\d+)", line)]
    # every stage that ran longer than the period printed progress while it ran, then its end
    ran = {m.group(1) for line in progress if (m := re.match(r"  (\w+): (running|\d+/\d+)", line))}
    ended = {m.group(1) for line in progress if (m := re.match(r"  (\w+): done.* in \d+s$", line))}
    assert ran and ran <= ended, res.stderr
    lines = [line for line in text.splitlines() if line not in progress]
    assert len(lines) <= 20, text
    for noise in ("INFO", "WARNING", "Warning", "it/s]", "\r", "Traceback", "4200 (after"):
        assert noise not in text, (noise, text)
    assert any(line.startswith("iter ") and "held-out" in line for line in lines)
    assert any(line.startswith("0 ") for line in lines) and any(line.startswith("1 ") for line in lines)
    assert any("starting policy" in line and "-> iteration 1" in line for line in lines)
    assert any(line.startswith("MLflow:  http://127.0.0.1:5000/#/experiments/") for line in lines)


def test_registered_model_name_is_one_per_algorithm_and_base_model():
    from flows.cards import registered_name
    from schemas.params import PipelineParams

    def name(**kw):
        return registered_name(PipelineParams.model_validate(kw))

    assert name(algorithm="gtpo", model="smollm2") == "turntree-gtpo-smollm2"
    assert name(algorithm="grpo", model="/m/SmolLM2-135M-Instruct/") == "turntree-grpo-smollm2-135m-instruct"
    assert name(algorithm="gtpo", model="tiny") != name(algorithm="gtpo", model="smollm2")


def test_health_rows_and_chart_from_the_manifest():
    from flows.health_view import health_png, health_rows

    rows = health_rows(_manifest())
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert rows[0]["held_out"] == 0.25 and rows[2]["held_out"] == 0.75 and rows[1]["held_out"] is None
    assert rows[2]["held_out_low"] is not None and rows[2]["held_out_low"] <= 0.75 <= rows[2]["held_out_high"]
    png = health_png(_manifest())
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    assert health_png({"stages": {}}) is None


def test_a_typed_flow_run_name_is_kept_and_prefects_own_is_replaced_by_the_run_id():
    from prefect.utilities.names import generate_slug

    from flows.flowrun import generated_name

    assert all(generated_name(generate_slug(2)) for _ in range(500))
    for typed in ("my-baseline", "gtpo lr 1e-5", "grpo-seed0", "Ablation-Run", "nightly"):
        assert not generated_name(typed), typed
