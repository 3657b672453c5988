"""Against a real `prefect server start` on 127.0.0.1: deploy the flows to a process work pool with
`turntree deploy` and run a stage rerun through a worker, as a user scheduling from the UI would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.runner import RunContext, run_stage
from flows.runstore import RunStore
from flows.serve import start_prefect_server, stop, wait_healthy
from schemas.params import DataParams
from tests.serving import banner, start_serve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deploy_and_run_through_a_worker(tmp_path):
    root = tmp_path / "runs"
    store = RunStore(str(root), "served")
    store.create_or_open({"algorithm": "gtpo"})
    params = DataParams(sources=["synthetic:func-synth"], synthetic_count=6)
    run_stage("data", params, {}, RunContext(root=str(root), run_id="served", algo="gtpo"), None)

    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(tmp_path / "server.log", "w")
    server = start_prefect_server(port, log, env)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/api/health", server, 120), (
            tmp_path / "server.log"
        ).read_text()[-2000:]
        dep = subprocess.run(
            [str(BIN / "turntree"), "deploy", "--pool", "tt-test"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        run = subprocess.run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "turntree-stage/stage",
                "--param",
                "run_id=served",
                "--param",
                "stage=data",
                "--param",
                f"run_root={json.dumps(str(root))}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "tt-test", "--run-once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        entry = store.load()["stages"]["data"]
        assert entry["current"] == "v2", worker.stdout[-3000:] + worker.stderr[-3000:]
        assert (root / "served" / "data" / "v1" / "problems.parquet").is_file()
        assert (root / "served" / "data" / "v2" / "problems.parquet").is_file()
        # what the UI shows: the pipeline deployment takes a Quick run (every parameter has a default), its
        # pull step names no directory of the deploying machine, and it has tags, a limit and a schedule
        quick = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "turntree-pipeline/pipeline"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert quick.returncode == 0, quick.stdout + quick.stderr
        code = (
            "import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    d = c.read_deployment_by_name('turntree-pipeline/pipeline')\n"
            "    s = c.read_deployment_by_name('turntree-stage/stage')\n"
            "    print(json.dumps({'pull': d.pull_steps, 'tags': d.tags, 'limit': d.global_concurrency_limit.limit,"
            " 'schedules': len(d.schedules), 'stage': s.parameter_openapi_schema['properties']['stage'],"
            " 'params': d.parameters, 'reruns': [r.name for r in c.read_flow_runs() if 'rerun' in r.tags]},"
            " default=str))\n"
        )
        info = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert info.returncode == 0, info.stderr[-2000:]
        dep_info = json.loads(info.stdout.strip().splitlines()[-1])
        assert str(REPO) not in json.dumps(dep_info["pull"]) and "turntree" in dep_info["tags"]
        assert dep_info["limit"] == 1 and dep_info["schedules"] == 1
        assert "score" in json.dumps(dep_info["stage"])  # a choice of stages, not free text
        # Quick run trains the main job (configs/default.yaml), not the bare parameter defaults
        assert dep_info["params"]["params"] == yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
        assert dep_info["reruns"] == ["served/data v2"]  # the rerun is named after its run, stage and version
    finally:
        stop(server)
        log.close()
    assert server.poll() is not None


@pytest.mark.slow
def test_serve_starts_both_uis_and_stops_them(tmp_path):
    import signal
    import time
    import urllib.request

    from flows.tracking import Tracker

    root = tmp_path / "runs"
    Tracker(str(root)).start_parent("visible-run", {"a": 1}, {"stage": "pipeline"})
    pp, mp = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = start_serve(root, pp, mp, env)
    try:
        out = banner(proc)
        assert f"http://127.0.0.1:{pp}" in out and f"http://127.0.0.1:{mp}" in out, out
        with urllib.request.urlopen(f"http://127.0.0.1:{pp}/api/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{pp}/ui-settings", timeout=10) as r:
            assert json.loads(r.read())["api_url"] == f"http://127.0.0.1:{pp}/api"  # the UI calls this port
        assert (root / "logs" / "prefect-server.log").stat().st_size > 0
        assert (root / "logs" / "mlflow-server.log").is_file()
        exp_url = f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/get-by-name?experiment_name=turntree"
        with urllib.request.urlopen(exp_url, timeout=10) as r:
            exp_id = json.loads(r.read())["experiment"]["experiment_id"]
        # the banner links the training experiment (and the evaluations') in the Model training view
        assert f"training runs: http://127.0.0.1:{mp}/#/experiments/{exp_id}?workflowType=machine_learning" in out
        assert "evaluations: http://127.0.0.1:" in out
        req = urllib.request.Request(
            f"http://127.0.0.1:{mp}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert b"visible-run" in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    time.sleep(1)
    for port in (pp, mp):  # both servers are gone: their ports are free again
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
