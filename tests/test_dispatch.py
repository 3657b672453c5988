"""Each stage a step of its own: the dispatch configuration and its one-line errors, the run lock a dispatched
stage writes under, the stage job's exit codes, and (slow) a tiny pipeline whose stages run as flow runs on two
real process work pools, each picked up by its own real `prefect worker`, against a real `prefect server`."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
import yaml

from flows.cli import main
from flows.locks import NotAuthorised, RunLocked, authorised, held_token, run_lock
from schemas.params import PipelineParams, StageName
from schemas.params.presets import tiny_pipeline
from stages import PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_stage_names_are_the_pipeline_stages():
    assert get_args(StageName) == PIPELINE_STAGES


def test_dispatch_picks_pools_and_stays_out_of_the_run_identity(tmp_path):
    from flows.runner import default_run_id

    base = PipelineParams.model_validate({"run_root": str(tmp_path)})
    p = PipelineParams.model_validate({"run_root": str(tmp_path), "dispatch": {"pools": {"rollout": "gpu"}}})
    assert p.dispatch.pool_for("rollout") == "gpu" and p.dispatch.pool_for("score") is None
    assert base.dispatch.used_pools(PIPELINE_STAGES) == []  # the default: every stage in-process
    d = PipelineParams.model_validate({"dispatch": {"default": "cpu", "pools": {"update": "gpu"}}}).dispatch
    assert d.used_pools(PIPELINE_STAGES) == ["cpu", "gpu"] and d.pool_for("data") == "cpu"
    # where stages run does not change what they compute: same run id, same manifest parameters (resumable)
    assert default_run_id(p) == default_run_id(base) and p.identity() == base.identity()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["dispatch.pools.rolout=gpu"], "dispatch.pools.rolout.[key]: Input should be 'data', 'warmstart'"),
        (["dispatch.pools.rollout=g p u"], "pools.rollout: 'g p u' is not a work pool name"),
        (["dispatch.default="], "default: '' is not a work pool name"),
        (["dispatch.pool.rollout=gpu"], "dispatch.pool: unknown parameter"),
    ],
)
def test_bad_dispatch_config_is_one_line_exit_2(sets, message, tmp_path, capsys):
    argv = ["run", "--root", str(tmp_path / "runs"), "--set", "model=tiny"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_dispatch_without_a_reachable_server_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["run", "--set", "model=tiny", "--set", "dispatch.pools.rollout=gpu"]
    assert main([*argv, "--root", "relative-runs"]) == 2
    assert "run_root 'relative-runs' is relative" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        assert main([*argv, "--root", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert (
        f"the Prefect server at http://127.0.0.1:{port}/api does not answer" in err and err.count("\n") == 1
    )
    assert not (tmp_path / "runs").exists()


_HOLDER = """
import sys, time
from flows.locks import held_token, run_lock
with run_lock(sys.argv[1], "r1"):
    print(held_token(sys.argv[1], "r1"), flush=True)
    sys.stdin.readline()
"""


def test_a_dispatched_step_writes_only_under_the_holders_token(tmp_path):
    root = str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, root],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        token = holder.stdout.readline().strip()
        assert len(token) == 32
        with authorised(root, "r1", token):  # the pipeline's token: this step may write
            pass
        with pytest.raises(NotAuthorised, match=f"process {holder.pid}, which did not dispatch"):
            with authorised(root, "r1", "f" * 32):  # a forged or stale token
                pass
        with pytest.raises(RunLocked, match=f"process {holder.pid}"):
            with authorised(root, "r1", None):  # no token: a writer of its own, refused like `turntree stage`
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with pytest.raises(NotAuthorised, match="no longer locked by the pipeline"):
        with authorised(root, "r1", token):  # the holder has stopped: its steps write nothing any more
            pass
    with run_lock(root, "r1"):  # and the lock is free again, under a fresh token
        assert held_token(root, "r1") not in (None, token)
    assert held_token(root, "r1") is None


def test_stage_job_exit_codes():
    from flows.integrity import IntegrityError
    from flows.tasks import EX_TEMPFAIL, exit_code

    assert exit_code(KeyError("stage 'score' needs inputs")) == 2
    assert exit_code(IntegrityError("corrupt")) == 2
    assert exit_code(ConnectionResetError()) == EX_TEMPFAIL == 75
    assert exit_code(TimeoutError("rendezvous")) == 75
    assert exit_code(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")) == 75
    assert exit_code(FileNotFoundError("x")) == 1 and exit_code(RuntimeError("boom")) == 1


# --- the real thing: server, two pools, two workers ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parquet_hashes(base: Path) -> dict[str, str]:
    return {
        str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(base.rglob("*.parquet"))
    }


_API = """
import json, sys, httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
pipeline_id = sys.argv[1]
out = {"steps": {}, "workers": {}}
with get_client(sync_client=True) as c:
    out["pipeline"] = {"state": c.read_flow_run(pipeline_id).state_type.value}
    runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["turntree-stage-step"])), limit=200)
    for r in runs:
        parent = c.read_task_run(r.parent_task_run_id).flow_run_id if r.parent_task_run_id else None
        out["steps"][str(r.id)] = {"name": r.name, "pool": r.work_pool_name, "state": r.state_type.value,
                                   "infra_pid": r.infrastructure_pid, "parent_flow_run": str(parent),
                                   "message": r.state.message}
    body = {"filter": {"event": {"name": ["prefect.worker.submitted-flow-run"]}}, "limit": 50}
    events = c._client.post("/events/filter", json=body).json()["events"]
    for e in events:
        for rel in e.get("related", []):
            if rel["prefect.resource.id"].startswith("prefect.flow-run."):
                out["workers"][rel["prefect.resource.id"].rsplit(".", 1)[1]] = e["resource"]["prefect.resource.name"]
print(json.dumps(out))
"""


@pytest.mark.scaleout
@pytest.mark.slow
def test_stages_run_as_flow_runs_on_two_pools_by_two_workers(tiny_model, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    config = tmp_path / "tiny.yaml"
    body = tiny_pipeline(str(tiny_model), "unused")
    del body["run_root"]  # --root says where each run goes
    config.write_text(yaml.safe_dump(body))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        f = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(p)
        return p

    def turntree(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def tail(name: str) -> str:
        return (logs / f"{name}.log").read_text()[-3000:]

    from flows.serve import stop, wait_healthy

    server = start(
        "server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    )
    try:
        assert wait_healthy(f"{api}/health", server, 180), tail("server")
        dep = turntree("deploy", "--pool", "cpu", "--pool", "gpu", timeout=300)
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        for pool in ("cpu", "gpu"):
            start(f"{pool}-worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name",
                                     f"{pool}-worker", "--type", "process"])  # fmt: skip

        # an unknown pool: one line, exit 2, before a run directory exists
        bad = turntree("run", "--config", str(config), "--root", str(tmp_path / "bad"),
                       "--set", "dispatch.pools.rollout=nope")  # fmt: skip
        assert bad.returncode == 2 and "no work pool 'nope'" in bad.stderr and bad.stderr.count("\n") == 1, (
            bad.stderr
        )
        assert not (tmp_path / "bad").exists()

        local = turntree("run", "--config", str(config), "--root", str(tmp_path / "local"))
        assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
        pools = {"data": "cpu", "score": "cpu", "advantages": "cpu", "rollout": "gpu", "update": "gpu",
                 "evaluate": "gpu"}  # fmt: skip
        sets = [x for s, p in pools.items() for x in ("--set", f"dispatch.pools.{s}={p}")]
        dispatched_cmd = ["run", "--config", str(config), "--root", str(tmp_path / "pooled"), *sets]
        t0 = time.monotonic()
        pooled = turntree(*dispatched_cmd)
        elapsed = time.monotonic() - t0
        assert pooled.returncode == 0, pooled.stdout[-3000:] + pooled.stderr[-3000:] + tail("gpu-worker")
        print(f"dispatched tiny pipeline: {elapsed:.0f}s")

        [run_dir] = [d for d in (tmp_path / "pooled").iterdir() if (d / "manifest.json").is_file()]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "completed"
        info = subprocess.run([sys.executable, "-c", _API, manifest["prefect_flow_run_id"]], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert info.returncode == 0, info.stderr[-3000:]
        api_view = json.loads(info.stdout.strip().splitlines()[-1])
        assert api_view["pipeline"]["state"] == "COMPLETED"
        keys = ["data", "iter-0/evaluate", *(f"iter-1/{s}" for s in ("rollout", "score", "advantages", "update",
                                                                     "evaluate"))]  # fmt: skip
        assert sorted(manifest["stages"]) == sorted(keys)
        driver = manifest["driver"]["pid"]
        seen_pids = set()
        for key in keys:
            stage = key.rsplit("/", 1)[-1]
            rec = manifest["stages"][key]["versions"]["v1"]
            by = rec["made_by"]
            step = api_view["steps"][by["flow_run_id"]]  # its own flow run of the stage-step deployment ...
            assert step["pool"] == pools[stage], (key, step)  # ... on the pool the configuration chose ...
            assert api_view["workers"][by["flow_run_id"]] == f"{pools[stage]}-worker", (
                key
            )  # ... by its worker
            assert step["state"] == "COMPLETED" and step["name"] == f"{run_dir.name}/{key}"
            assert (
                step["parent_flow_run"] == manifest["prefect_flow_run_id"]
            )  # a subflow of the pipeline's run
            assert (
                step["infra_pid"].rsplit(":", 1)[-1] == str(by["pid"]) and by["pid"] != driver
            )  # in the worker's process
            seen_pids.add(by["pid"])
        assert len(seen_pids) == len(keys)  # a process per stage
        assert len(api_view["steps"]) == len(keys)

        # the same tables as the in-process run with the same seed (same run id: dispatch is not part of it)
        local_dir = tmp_path / "local" / run_dir.name
        assert local_dir.is_dir()
        local_tables = _parquet_hashes(local_dir)
        assert len(local_tables) == len(keys) - 1  # every stage but the update writes a table
        assert _parquet_hashes(run_dir) == local_tables
        weights = "iter-1/update/v1/checkpoint/model.safetensors"  # and the update the same weights
        assert (run_dir / weights).read_bytes() == (local_dir / weights).read_bytes()

        # resuming dispatches nothing: every stage is reused from its verified committed version
        again = turntree(*dispatched_cmd)
        assert again.returncode == 0, again.stderr[-3000:]
        info = subprocess.run([sys.executable, "-c", _API, manifest["prefect_flow_run_id"]], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert len(json.loads(info.stdout.strip().splitlines()[-1])["steps"]) == len(keys)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert all(manifest["stages"][k]["current"] == "v1" for k in keys)

        # a stage step that no pipeline dispatched (no lock holder, a forged token) writes nothing
        forged = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "turntree-stage-step/step-cpu", "--watch",
             "--params", json.dumps({"request": {"stage": "data", "run_id": run_dir.name,
                                                 "run_root": str(tmp_path / "pooled"),
                                                 "params": manifest["params"]["data"]},
                                     "lock_token": "f" * 32})],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert forged.returncode != 0, forged.stdout[-2000:]
        info = subprocess.run([sys.executable, "-c", _API, manifest["prefect_flow_run_id"]], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        [failed] = [
            s
            for s in json.loads(info.stdout.strip().splitlines()[-1])["steps"].values()
            if s["state"] != "COMPLETED"
        ]
        assert "no longer locked by the pipeline that dispatched this stage step" in failed["message"], failed
        assert json.loads((run_dir / "manifest.json").read_text())["stages"]["data"]["current"] == "v1"
    finally:
        for p in reversed(procs):
            stop(p)
