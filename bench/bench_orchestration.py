"""Orchestration overhead: the same pipeline run through Prefect versus calling the stage functions directly.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_orchestration.py [--model tiny|smollm2|DIR] [--iterations 1]

Both paths run ``flows.pipeline.drive`` (the same stage sequence, the same run store and MLflow logging); one
calls each stage through the cached Prefect task inside the flow, the other calls ``flows.runner.run_stage``.
Each uses a fresh run id so nothing is cached. The vLLM engine is built once by a warm-up run beforehand so
neither path pays for it. Printed: wall times and the ratio Prefect / direct, plus the one-off start of the
ephemeral Prefect server (first flow run in a process).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)


def params_for(model: str, root: str, run_id: str, iterations: int):
    from schemas.params import PipelineParams
    from schemas.params.presets import tiny_pipeline

    body = tiny_pipeline(  # the tests' tiny pipeline, scaled up so stage work is measurable
        model,
        root,
        "gtpo",
        run_id=run_id,
        iterations=iterations,
        data={"synthetic_count": 16},
        rollout={"group_size": 4, "problems_per_iteration": 4, "max_new_tokens": 32},
        update={"minibatch_size": 8, "micro_batch_size": 4},
        eval={"max_problems": 4, "max_new_tokens": 32, "bootstrap": 100},
    )
    return PipelineParams.model_validate(body)


def direct(params) -> float:
    from flows.pipeline import drive
    from flows.runner import RunContext, params_field, run_stage
    from flows.runstore import RunStore
    from flows.tracking import Tracker
    from runtime.models import resolve_model

    t = time.perf_counter()
    store = RunStore(params.run_root, params.run_id)
    store.create_or_open(params.identity())
    tracker = Tracker(params.run_root)
    parent = tracker.start_parent(params.run_id, params.model_dump(mode="json"), {"algo": params.algorithm})
    ctx = RunContext(root=params.run_root, run_id=params.run_id, algo=params.algorithm, mlflow_parent=parent)

    def call(stage, p, inputs, ctx, it, upstream=()):
        return run_stage(stage, getattr(p, params_field(stage)), inputs, ctx, it)

    drive(params, ctx, call, str(resolve_model(params.model)))
    tracker.end(parent)
    return time.perf_counter() - t


def through_prefect(params) -> float:
    from flows.pipeline import pipeline

    t = time.perf_counter()
    pipeline(params)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--iterations", type=int, default=1)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-orch-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # checkpoints: GBs per run
    os.environ.setdefault("PREFECT_HOME", f"{root}/prefect-home")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", f"{root}/prefect-results")
    from prefect.testing.utilities import prefect_test_harness

    warm = direct(params_for(a.model, root, "warmup", a.iterations))
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        server = time.perf_counter() - t0
        p1 = through_prefect(params_for(a.model, root, "prefect-1", a.iterations))
        d1 = direct(params_for(a.model, root, "direct-1", a.iterations))
        p2 = through_prefect(params_for(a.model, root, "prefect-2", a.iterations))
        d2 = direct(params_for(a.model, root, "direct-2", a.iterations))
    pre, dir_ = min(p1, p2), min(d1, d2)
    print(f"model={a.model} iterations={a.iterations} (warm-up direct run incl. engine build: {warm:.1f}s)")
    print(f"ephemeral Prefect server start: {server:.1f}s (once per process)")
    print(f"direct stage calls: {d1:.1f}s, {d2:.1f}s   through Prefect: {p1:.1f}s, {p2:.1f}s")
    print(
        f"orchestration overhead: {pre - dir_:+.1f}s per pipeline run; ratio prefect/direct = {pre / dir_:.2f}x"
    )


if __name__ == "__main__":
    main()
