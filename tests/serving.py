"""Starting ``turntree serve`` for the tests that drive the served UIs (its own session, so a test can stop the
whole process group)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def start_serve(root: Path, prefect_port: int, mlflow_port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [str(BIN / "turntree"), "serve", "--root", str(root)]
    cmd += ["--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
