"""What a user of the Prefect and MLflow UIs sees of a run, read back from a real (ephemeral) Prefect server and
MLflow on SQLite: the pipeline's warnings in the flow run's logs and summary, a skipped update as a node of the
graph (state Skipped, drawn after the advantages that made it skip), reused stages in a Cached state (issue 26
item 6); a stage rerun named and tagged with its version in both, listed on the pipeline's flow run, and a
summary on the terminal (item 2)."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from flows.runstore import RunStore
from schemas.params import PipelineParams
from schemas.params.presets import tiny_pipeline


@pytest.mark.slow
def test_warnings_skipped_updates_and_reused_stages_show_in_prefect(tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from flows.tasks import artifact_key

    # the random tiny model earns the same reward everywhere: with tied groups dropped, the update is skipped
    body = tiny_pipeline(
        str(tiny_model),
        str(tmp_path / "runs"),
        "grpo",
        advantages={"keep_zero_signal": False},
        eval={"max_problems": 1},
    )
    params = PipelineParams.model_validate(body)

    def task_runs(client, flow_run_id):
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        return {t.name: t for t in client.read_task_runs(flow_run_filter=flt)}

    with prefect_test_harness(server_startup_timeout=180):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results-1"}):
            result = pipeline(params)
        store = RunStore(params.run_root, result["run_id"])
        first = store.load()["prefect_flow_run_id"]
        APILogHandler().flush()  # logs go to the server in batches
        with get_client(sync_client=True) as client:
            tasks = task_runs(client, first)
            for _ in range(20):
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[first])))
                if any("update skipped" in x.message for x in logs):
                    break
                time.sleep(0.5)
            artifacts = client.read_artifacts()
        skipped = tasks["update[iter=1]"]
        assert skipped.state_name == "Skipped" and "no sample carries signal" in skipped.state.message
        assert str(tasks["advantages[iter=1]"].id) in {str(i.id) for i in skipped.task_inputs["upstream"]}
        warned = [x for x in logs if x.level == logging.WARNING and "update skipped" in x.message]
        assert warned, [(x.level, x.message) for x in logs]
        (summary,) = [a for a in artifacts if a.key == artifact_key(result["run_id"], "summary")]
        assert "## Warnings" in summary.data and "update skipped" in summary.data
        # the RL health table (iteration 0: the starting policy, with its CI) and links to chart and completions
        assert "| iteration | held-out (95% CI) | reward | correct | zero-signal |" in summary.data
        assert re.search(r"\| 0 \| [\d.]+ \(\d+/\d+\) \[[\d.]+, [\d.]+\] \|", summary.data), summary.data
        assert re.search(
            r"\| 1 \| [\d.]+ \(\d+/\d+\) \[[\d.]+, [\d.]+\] \| [-\d.]+ \| [\d.]+ \| 1.00 \|", summary.data
        )
        assert "health.png" in summary.data and "completions/iter-1.html" in summary.data

        # the same run again, Prefect's own result cache elsewhere: each stage is reused from the run store
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results-2"}):
            pipeline(params)
        second = store.load()["prefect_flow_run_id"]
        assert second != first
        with get_client(sync_client=True) as client:
            tasks = task_runs(client, second)
        reused = {n: t.state_name for n, t in tasks.items() if "[iter=" in n and not n.startswith("update")}
        assert reused and set(reused.values()) == {"Cached"}, reused
        _rerun_is_visible(params, result["run_id"], second)


def _rerun_is_visible(params: PipelineParams, rid: str, pipeline_run: str) -> None:
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.tasks import artifact_key
    from flows.tracking import tracking_uri

    root = params.run_root
    out = _cli(["stage", "score", "--run", rid, "--iter", "1", "--root", root, "--set", "shaping_alpha=0.3"])
    lines = out.splitlines()
    assert lines[0] == f"run {rid}: iter-1/score rerun as v2 (now current) with shaping_alpha=0.3", out
    assert any(line.startswith("  read   trajectories: iter-1/rollout v1") for line in lines), out
    assert any(line.startswith("  wrote  trajectories: ") and "/iter-1/score/v2/" in line for line in lines)
    assert any(line.startswith("  now stale: iter-1/advantages") for line in lines), out
    as_json = json.loads(_cli(["stage", "score", "--run", rid, "--iter", "1", "--root", root, "--json"]))
    assert as_json["version"] == "v3" and as_json["overrides"] == {}

    with get_client(sync_client=True) as client:
        reruns = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"run:{rid}", "rerun"]))
        )
        (listing,) = [a for a in client.read_artifacts() if a.key == artifact_key(rid, "reruns")][-1:]
    assert sorted(r.name for r in reruns) == [f"{rid}/iter-1/score v2", f"{rid}/iter-1/score v3"]
    assert "stage:iter-1/score" in reruns[0].tags
    assert str(listing.flow_run_id) == pipeline_run and "| `iter-1/score` | v2 |" in listing.data
    assert '"shaping_alpha": 0.3' in listing.data

    store = RunStore(root, rid)
    client = mlflow.MlflowClient(tracking_uri(root))
    parent = store.load()["mlflow_run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    score = {c.info.run_name: c.data.tags for c in children if c.data.tags.get("stage") == "score"}
    assert score["iter-1/score v3"]["turntree.current"] == "true"
    assert score["iter-1/score v2"]["turntree.current"] == "false"
    assert score["iter-1/score v1"]["turntree.current"] == "false"
    assert json.loads(score["iter-1/score v2"]["turntree.overrides"]) == {"shaping_alpha": 0.3}
    assert (
        score["iter-1/score v2"]["turntree.version"] == "v2"
        and "turntree.rerun" not in score["iter-1/score v1"]
    )


def _cli(argv: list[str]) -> str:
    import contextlib
    import io

    from flows.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()
