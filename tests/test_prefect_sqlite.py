"""The Prefect server `turntree serve` starts begins its SQLite write transactions IMMEDIATE (flows/prefect_sqlite.py):
with workers polling, creating flow runs the way the UI's Quick run does (one POST, no retry) is never answered 503,
and the server logs no "database is locked". Unpatched Prefect 3.7 answered about 5% of such POSTs 503 and logged
~200 lock errors in the same 80 calls (measured with two workers polling every second)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.serve import start_prefect_server, stop, wait_healthy
from tests.backends import free_port

BIN = Path(sys.executable).parent


def test_the_patch_begins_every_transaction_immediate_and_is_idempotent():
    code = """
import asyncio
from contextlib import asynccontextmanager
from flows.prefect_sqlite import begin_sqlite_writes_immediately
from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration

class Session:  # records the BEGIN mode Prefect's configuration would emit for this transaction
    modes = []
    @asynccontextmanager
    async def begin(self):
        self.modes.append(SQLITE_BEGIN_MODE.get())
        yield self

async def main(cfg):
    async with cfg.begin_transaction(Session()):
        pass
    async with cfg.begin_transaction(Session(), with_for_update=True):
        pass

cfg = AioSqliteConfiguration("sqlite+aiosqlite:///unused.db")
asyncio.run(main(cfg))
assert begin_sqlite_writes_immediately() and begin_sqlite_writes_immediately()
asyncio.run(main(cfg))
print(Session.modes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # unpatched: a plain transaction is DEFERRED; patched (twice: no double wrapping), both are IMMEDIATE
    assert out.stdout.split("\n")[-2] == "['DEFERRED', 'IMMEDIATE', 'IMMEDIATE', 'IMMEDIATE']"


def _call(api: str, path: str, data: dict | None = None, method: str | None = None) -> tuple[int, object]:
    """One request, no retry (as the Prefect UI sends it); one with a body carries the server's CSRF token."""
    headers = {"Content-Type": "application/json"}
    if data is not None:
        with urllib.request.urlopen(f"{api}/csrf-token?client=tt-sqlite", timeout=60) as r:
            token = json.loads(r.read())["token"]
        headers |= {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "tt-sqlite"}
    body = json.dumps(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(api + path, body, headers, method=method), timeout=120
        ) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:300]


@pytest.mark.slow
def test_creating_flow_runs_beside_polling_workers_is_never_answered_503(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # polls (and their writes) every second
    }
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")  # noqa: SIM115
    server = start_prefect_server(port, log, env)
    workers: list[subprocess.Popen] = []
    try:
        assert wait_healthy(f"{api}/health", server, 120), log_path.read_text()[-2000:]
        dep = subprocess.run(
            [str(BIN / "turntree"), "deploy", "--pool", "tt-sqlite"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        for i in range(2):
            workers.append(
                subprocess.Popen(
                    [str(BIN / "prefect"), "worker", "start", "--pool", "tt-sqlite"],
                    env=env,
                    stdout=open(tmp_path / f"worker{i}.log", "w"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=tmp_path,
                )
            )
        deadline = time.monotonic() + 120
        deployment = None
        while time.monotonic() < deadline and deployment is None:  # a worker has polled: it is marked ready
            code, deps = _call(api, "/deployments/filter", {})
            ready = (
                [d for d in deps if d["name"] == "pipeline" and d["status"] == "READY"] if code == 200 else []
            )
            deployment = ready[0] if ready else None
            time.sleep(1)
        assert deployment is not None, (tmp_path / "worker0.log").read_text()[-2000:]
        # runs scheduled an hour out: the workers keep polling (and writing) but start none of them
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        state = {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}
        codes, answers = [], []
        for _ in range(60):
            code, answer = _call(api, f"/deployments/{deployment['id']}/create_flow_run", {"state": state})
            codes.append(code)
            answers += [answer] if code != 201 else []
            time.sleep(0.3)
        assert codes == [201] * 60, (codes, answers[:2])
        # the UI's pause toggle: the queue's update reads the pool in a plain session nested in its transaction,
        # which must not wait on its own caller's lock (it did for 60 s, then 503, until plain sessions ran
        # without a BEGIN mode)
        started = time.monotonic()
        code, answer = _call(api, "/work_pools/tt-sqlite/queues/default", {"is_paused": True}, method="PATCH")
        assert code == 204 and time.monotonic() - started < 30, (code, answer, time.monotonic() - started)
        assert _call(api, "/work_pools/tt-sqlite/queues/default")[1]["is_paused"] is True
        assert "database is locked" not in log_path.read_text()
    finally:
        for w in workers:
            stop(w)
        stop(server)
        log.close()
