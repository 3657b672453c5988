"""MLflow tracking helpers: each run root keeps its own store, and nothing leaks into the environment."""

from __future__ import annotations

import os

from mlflow import MlflowClient

from flows.tracking import Tracker, flatten


def test_two_run_roots_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = Tracker(str(tmp_path / "a")), Tracker(str(tmp_path / "b"))
    assert a.uri != b.uri and "MLFLOW_TRACKING_URI" not in os.environ
    ra = a.start_parent("run-a", {"x": 1}, {"stage": "pipeline"})
    rb = b.start_parent("run-b", {"x": 2}, {"stage": "pipeline"})
    names = {}
    for t in (a, b):
        client = MlflowClient(t.uri)
        exp = client.get_experiment_by_name("turntree")
        names[t.uri] = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert names == {a.uri: {"run-a"}, b.uri: {"run-b"}}
    assert MlflowClient(a.uri).get_run(ra).data.params == {"x": "1"}
    assert MlflowClient(b.uri).get_run(rb).data.params == {"x": "2"}


def test_user_tracking_uri_wins(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert Tracker(str(tmp_path / "runs")).uri == uri


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": "1",
        "a.c.d": "[1, 2]",
        "e": "None",
    }


def test_remote_root_without_a_tracking_server_is_refused_not_tracked_locally(tmp_path, monkeypatch):
    import pytest

    from flows.tracking import TrackingNotConfigured, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingNotConfigured, match="MLFLOW_TRACKING_URI is not set"):
        Tracker("s3://bucket/runs")
    assert list(tmp_path.iterdir()) == []  # no ./runs/mlflow.db fallback
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri("s3://bucket/runs") == "http://mlflow.example:5000"


def test_links_point_at_the_tracking_server_the_run_logged_to(monkeypatch):
    from flows.console import links
    from flows.tracking import ui_base

    monkeypatch.delenv("TURNTREE_MLFLOW_UI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    assert ui_base() == "http://mlflow.example:5000"
    out = links({"mlflow_run_id": "abc"}, "7", "s3://bucket/runs")
    assert out == [
        "MLflow:  http://mlflow.example:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    ]
    # no UI of its own: links go to the one `turntree serve` starts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert ui_base() == "" and "after `turntree serve" in links({"mlflow_run_id": "abc"}, "7", "runs")[0]


def test_serve_starts_no_mlflow_server_on_top_of_a_tracking_server(tmp_path, monkeypatch):
    import pytest

    from flows.serve import mlflow_store
    from flows.tracking import TrackingNotConfigured

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    assert mlflow_store("s3://bucket/runs") is None and mlflow_store(str(tmp_path)) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_store(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingNotConfigured):
        mlflow_store("s3://bucket/runs")


def test_evaluations_have_their_own_experiment_and_children_follow_their_parent(tmp_path, monkeypatch):
    from flows.tracking import EVAL_EXPERIMENT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, evals = Tracker(str(tmp_path)), Tracker(str(tmp_path), EVAL_EXPERIMENT)
    assert train.experiment_id != evals.experiment_id
    parent = evals.start_parent("eval-1", {}, {"stage": "evaluate"})
    child = train.start_child(parent, "evaluate", {}, {"stage": "evaluate"})  # any tracker of the root
    client = MlflowClient(train.uri)
    assert client.get_run(child).info.experiment_id == evals.experiment_id
    assert {r.info.run_name for r in client.search_runs([train.experiment_id])} == set()
    assert evals.experiment_url().endswith(f"/#/experiments/{evals.experiment_id}?workflowType=machine_learning")


def test_end_stale_kills_only_the_running_children_of_that_parent_whose_process_is_gone(tmp_path, monkeypatch):
    """A SIGKILLed attempt leaves its stage runs RUNNING; the next attempt ends exactly those as KILLED, tagged with
    why: not finished children, not another parent's, not one whose process still runs here, not one written on
    another host (a dispatched stage may be live there)."""
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = Tracker(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = dead.stdout.strip()  # a process that has exited
    parent, other = (t.start_parent(n, {}, {"stage": "pipeline"}) for n in ("run-a", "run-b"))
    names = ("data", "rollout", "update", "evaluate", "remote")
    done, left_a, left_b, live, remote = (t.start_child(parent, n, {}, {"stage": n}) for n in names)
    assert t.client.get_run(live).data.tags["turntree.pid"] == str(os.getpid())  # every child names its writer
    t.end(done)
    for run in (left_a, left_b, remote):
        t.set_tags(run, {"turntree.pid": dead_pid})
    t.set_tags(remote, {"turntree.host": "another-host"})
    elsewhere = t.start_child(other, "rollout", {}, {"stage": "rollout"})
    t.set_tags(elsewhere, {"turntree.pid": dead_pid})
    ended = t.end_stale(t.experiment_id, f"tags.mlflow.parentRunId = '{parent}'", "killed attempt")
    assert sorted(ended) == sorted([left_a, left_b])
    runs = (parent, done, left_a, left_b, live, remote, elsewhere, other)
    status = [t.client.get_run(r).info.status for r in runs]
    assert status == ["RUNNING", "FINISHED", "KILLED", "KILLED", "RUNNING", "RUNNING", "RUNNING", "RUNNING"]
    assert t.client.get_run(left_a).data.tags["turntree.ended_by"] == "killed attempt"
    assert t.end_stale(t.experiment_id, f"tags.mlflow.parentRunId = '{parent}'", "again") == []
