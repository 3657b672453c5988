"""Rerun one named stage of an existing run from that run's stored inputs.

    turntree stage score --run gtpo-1a2b3c4d5e --iter 1 [--set shaping_alpha=0.3]

The rerun reads the inputs recorded for the stage's current version in the run manifest, each stored table at
its stage's *current* version (so ``stage score`` then ``stage advantages`` builds advantages on the new score),
deep-merges the parameter overrides into the recorded parameters, writes the next version (``v2``, ``v3``…),
marks it current and records the overrides with it. No other stage's output is touched; downstream stages keep
reading what they read before until they are rerun (``RunStore.stale_stages`` names them; the pipeline's next
run recomputes them from the current versions and keeps every rerun's own version). The MLflow child run is
linked to the run's parent with the ``mlflow.parentRunId`` tag, even when the parent finished long ago.
"""

from __future__ import annotations

from typing import Any, get_args

from prefect import flow, get_run_logger

from flows.locks import run_lock
from flows.runner import RunContext, params_model, rerun_params, run_stage
from flows.runstore import RunStore
from flows.watch import watched
from schemas.params import StageName  # a typed choice in the Prefect UI's run form
from stages import PIPELINE_STAGES

assert get_args(StageName) == PIPELINE_STAGES, "StageName must list stages.PIPELINE_STAGES"


def rerun(
    root: str,
    run_id: str,
    stage: str,
    iteration: int | None,
    overrides: dict[str, Any] | None = None,
    flow_run_id: str = "none",
) -> dict[str, Any]:
    with run_lock(root, run_id), watched(root, run_id):  # re-entrant: the CLI already holds both
        return _rerun(root, run_id, stage, iteration, overrides, flow_run_id)


def _rerun(root, run_id, stage, iteration, overrides, flow_run_id) -> dict[str, Any]:
    store = RunStore(root, run_id)
    manifest = store.load()
    record = store.stage_record(stage, iteration)
    params = params_model(stage).model_validate(rerun_params(stage, record["params"], overrides))
    inputs, moved = store.current_inputs(record["inputs"])  # a chain of reruns builds on each other
    ctx = RunContext(
        root=root,
        run_id=run_id,
        algo=manifest["params"].get("algorithm", "?"),
        mlflow_parent=manifest.get("mlflow_run_id"),
        flow_run_id=flow_run_id,
    )
    out = run_stage(stage, params, inputs, ctx, iteration)
    store.note_current(stage, iteration, overrides=overrides or {}, rebased_inputs=moved)
    return {
        "run_id": run_id,
        "stage": stage,
        "iteration": iteration,
        "version": store.load()["stages"][_key(stage, iteration)]["current"],
        "output": out.model_dump(mode="json"),
    }


def _key(stage: str, iteration: int | None) -> str:
    from flows.runstore import stage_key

    return stage_key(stage, iteration)


@flow(name="turntree-stage", log_prints=True)
def stage_flow(
    run_id: str,
    stage: StageName,
    iteration: int | None = None,
    overrides: dict[str, Any] | None = None,
    run_root: str = "runs",
) -> dict[str, Any]:
    """Rerun ``stage`` (of ``iteration``, when the stage is per-iteration) of run ``run_id``."""
    from prefect.runtime import flow_run

    result = rerun(run_root, run_id, stage, iteration, overrides, flow_run_id=str(flow_run.id or "none"))
    get_run_logger().info("stage %s of run %s rerun as %s", stage, run_id, result["version"])
    return result
