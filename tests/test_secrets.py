"""No secret where others can read it: credentials in a run root are refused before any work, URIs are recorded
without their passwords (manifest, MLflow), no database password on a command line, and the Prefect server
turntree starts answers its own origin only and wants a CSRF token for writes."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.cli import main

SECRET = "wJalrXUtnFEMI-K7MDENG"
CRED_ROOT = f"s3://AKIAEXAMPLE:{SECRET}@turntree-bucket/runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--root", CRED_ROOT],
        ["run", "--config", "{config}"],  # the root given in a config file
        ["stage", "score", "--run", "r1", "--root", CRED_ROOT],
        ["verify", "r1", "--root", CRED_ROOT],
        ["runs", "--root", CRED_ROOT],
        ["eval", "--model", "tiny", "--root", CRED_ROOT],
    ],
    ids=["run", "run-config", "stage", "verify", "runs", "eval"],
)
def test_a_run_root_with_credentials_is_refused_in_one_line(argv, tmp_path, monkeypatch, capsys):
    """``s3://KEY:SECRET@bucket/…`` would be recorded everywhere the root is: exit 2 before any work, one line
    that points at the AWS variables and does not repeat the secret."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing may be reached
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(f"run_root: {CRED_ROOT}\n")
    argv = [a.replace("{config}", str(config)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "has credentials in it" in err and "AWS_ACCESS_KEY_ID" in err and "s3://***@turntree-bucket" in err
    assert SECRET not in err and "AKIAEXAMPLE" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no run dir, database or lock


def test_the_run_store_and_list_runs_refuse_such_a_root():
    from flows.runstore import RunStore, list_runs
    from flows.uris import CredentialsInURI

    with pytest.raises(CredentialsInURI, match="AWS_ACCESS_KEY_ID"):
        RunStore(CRED_ROOT, "r1")
    with pytest.raises(CredentialsInURI):
        list_runs(CRED_ROOT)


def test_recorded_uris_carry_no_credentials(tmp_path, monkeypatch):
    """Whatever a URI with a password reaches is recorded without it: the run manifest, MLflow parameters,
    tags and logged dicts, the MLflow links."""
    from mlflow import MlflowClient

    from flows.runstore import RunStore
    from flows.tracking import Tracker

    db = "postgresql+psycopg2://mlflow:pg-s3cret@db:5432/mlflow"
    src = "https://reader:hub-s3cret@data.example/x.jsonl"
    store = RunStore(str(tmp_path / "runs"), "r1")
    store.create_or_open({"data": {"sources": [src]}})
    store.update(tracking_uri=db, note=f"copied from {src}")
    text = (tmp_path / "runs" / "r1" / "manifest.json").read_text()
    assert "s3cret" not in text, text
    manifest = json.loads(text)
    assert manifest["tracking_uri"] == "postgresql+psycopg2://***@db:5432/mlflow"
    assert manifest["params"]["data"]["sources"] == ["https://***@data.example/x.jsonl"]
    assert store.create_or_open({"data": {"sources": [src]}})["run_id"] == "r1"  # the same run, reopened
    from flows.tracking import ui_base

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://reader:ui-s3cret@mlflow.example:5000")
    assert ui_base() == "https://mlflow.example:5000"  # the links printed and put in Prefect's run summary
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracker = Tracker(str(tmp_path / "runs"))
    run = tracker.start_parent("r1", {"data": {"sources": [src]}, "db": db}, {"origin": src})
    tracker.log_dict(run, {"tracking_uri": db}, "config.json")
    got = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run).data
    assert "s3cret" not in json.dumps([got.params, got.tags])
    assert got.params["db"] == "postgresql+psycopg2://***@db:5432/mlflow" and got.tags["origin"].startswith(
        "https://***@"
    )
    logged = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).download_artifacts(
        run, "config.json", str(tmp_path)
    )
    assert "s3cret" not in Path(logged).read_text()


def test_the_mlflow_ui_gets_its_store_from_the_environment_not_its_command_line(monkeypatch):
    """Any user can read a process's arguments (/proc/<pid>/cmdline): the store URI `turntree serve` gives the
    MLflow server (a database URI may hold a password) goes in its environment."""
    from flows import serve

    started = {}

    class Popen:
        def __init__(self, cmd, env=None, **kw):
            started.update(cmd=cmd, env=env)

    monkeypatch.setattr(serve.subprocess, "Popen", Popen)
    uri = "postgresql+psycopg2://mlflow:pg-s3cret@db:5432/mlflow"
    serve.start_mlflow_ui(uri, 5999)
    assert not [a for a in started["cmd"] if "s3cret" in a or "postgresql" in a], started["cmd"]
    assert started["env"]["MLFLOW_BACKEND_STORE_URI"] == uri
    serve.start_prefect_server(4299, env={"PATH": os.environ["PATH"]})
    env = started["env"]
    assert env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4299,http://localhost:4299"
    assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true" and env["PATH"] == os.environ["PATH"]


def _request(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.slow
def test_the_served_prefect_api_answers_its_own_origin_and_wants_a_csrf_token(tmp_path):
    """A real `prefect server start` as `turntree serve` starts it: a page on another origin gets no CORS grant
    (Prefect's default is `*`), and a write without a CSRF token is refused while one with a token passes."""
    from flows.serve import start_prefect_server, stop, wait_healthy

    port = _free_port()
    api, own, evil = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}", "http://evil.example"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with open(tmp_path / "prefect.log", "w") as log:
        proc = start_prefect_server(port, log, env)
        try:
            assert wait_healthy(f"{api}/health", proc, 240), (tmp_path / "prefect.log").read_text()[-3000:]
            preflight = {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            }
            status, headers, _ = _request(f"{api}/flows/filter", "OPTIONS", {"Origin": evil, **preflight})
            assert headers.get("access-control-allow-origin") in (None, "") and status >= 400, (
                status,
                headers,
            )
            status, headers, _ = _request(f"{api}/health", headers={"Origin": evil})
            assert headers.get("access-control-allow-origin") in (None, ""), headers
            status, headers, _ = _request(f"{api}/flows/filter", "OPTIONS", {"Origin": own, **preflight})
            assert status == 200 and headers.get("access-control-allow-origin") == own, (status, headers)
            status, _, body = _request(f"{api}/flows/filter", "POST", body={})
            assert status == 403 and b"csrf" in body.lower(), (status, body)
            _, _, token = _request(f"{api}/csrf-token?client=turntree-test")
            csrf = {"Prefect-Csrf-Token": json.loads(token)["token"], "Prefect-Csrf-Client": "turntree-test"}
            status, _, body = _request(f"{api}/flows/filter", "POST", csrf, body={})
            assert status == 200, (status, body)
        finally:
            stop(proc)
