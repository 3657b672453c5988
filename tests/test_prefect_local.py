"""The temporary Prefect server a command starts (flows.prefect_local): in a session of its own, answering, and
ended by the kernel when the command is killed outright (SIGKILL runs no exit hook)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from tests.procs import alive

REPO = Path(__file__).resolve().parents[1]


def test_server_has_its_own_session_and_dies_with_a_killed_command(tmp_path):
    script = tmp_path / "command.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            sys.path.insert(0, {str(REPO)!r})
            from flows.prefect_local import start_local_server
            from prefect.server.api.server import SubprocessASGIServer
            url = start_local_server()
            (server,) = [s for s in SubprocessASGIServer._instances.values() if s.running]
            print(url, server.server_process.pid, flush=True)
            time.sleep(600)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    cmd = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        url, pid = cmd.stdout.readline().split()
        server = int(pid)
        with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
            assert r.status == 200
        assert os.getsid(server) == server != os.getsid(cmd.pid)  # a group signal to the command misses it
        cmd.send_signal(signal.SIGKILL)
        cmd.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and alive(server):
            time.sleep(0.1)
        assert not alive(server), "the server outlived the command that was killed"
    finally:
        if cmd.poll() is None:
            cmd.kill()


def test_a_configured_server_is_used_and_none_started(monkeypatch):
    from flows.prefect_local import start_local_server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert start_local_server() is None
