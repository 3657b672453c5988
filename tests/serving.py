"""Starting ``turntree serve`` for the tests that drive the served UIs (its own session, so a test can stop the
whole process group), and reading its start-up banner."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def start_serve(
    root: Path | str, prefect_port: int, mlflow_port: int, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen:
    cmd = [str(BIN / "turntree"), "serve", "--root", str(root)]
    cmd += ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def banner(proc: subprocess.Popen, timeout_s: float = 240) -> str:
    """What ``serve`` printed up to its "Ctrl-C" line (it is up), or up to its exit or ``timeout_s``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not any("Ctrl-C" in x for x in lines):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return "".join(lines)
