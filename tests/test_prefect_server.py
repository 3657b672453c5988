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

from flows.runner import RunContext, run_stage
from flows.serve import start_prefect_server, stop, wait_healthy
from schemas.params import DataParams
from stages.runstore import RunStore

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
    finally:
        stop(server)
        log.close()
    assert server.poll() is not None
