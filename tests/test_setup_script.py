"""infra/setup.sh: a no-op when nothing changed, and a reinstall when the extras asked for change.

The venv's python and uv are recording stand-ins here (the real install is what CI's set-up does); what is under
test is the script's decision to install, and what it asks uv for."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"
"""


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "infra").mkdir(parents=True)
    for name in ("pyproject.toml", "overrides.txt", "infra/setup.sh"):
        shutil.copy(REPO / name, root / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "uv"):
        (bin_dir / tool).write_text(RECORDER)
        (bin_dir / tool).chmod(0o755)
    return root


def _setup(root: Path, extras: str | None) -> list[str]:
    log = root / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TURNTREE_EXTRAS"}
    if extras is not None:
        env["TURNTREE_EXTRAS"] = extras
    subprocess.run(["bash", str(root / "infra" / "setup.sh")], env=env, check=True, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def test_setup_installs_once_and_again_when_the_extras_change(tmp_path):
    root = _project(tmp_path)
    first = _setup(root, None)
    assert any(c.startswith("uv pip install") and ".[cpu,lora,dev]" in c for c in first), first
    assert _setup(root, None) == []  # nothing changed: no install at all
    gpu = _setup(root, "gpu,lora,dev")
    assert any(c.startswith("uv pip install") and ".[gpu,lora,dev]" in c for c in gpu), gpu
    assert _setup(root, "gpu,lora,dev") == []
