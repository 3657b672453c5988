"""Evaluate a checkpoint on a benchmark, outside of a training run.

    turntree eval --checkpoint runs/<run>/iter-1/update/v1/checkpoint --benchmark humaneval
    turntree eval --model smollm2 --benchmark gsm8k --set max_problems=50

Results are stored as a run of their own (``eval-<hash>``) with an MLflow parent run tagged ``stage=evaluate``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import flow, get_run_logger

from flows.locks import run_lock
from flows.runner import RunContext, fingerprint, run_stage, stage_code
from flows.runstore import RunStore
from flows.tasks import prepare_model
from flows.tracking import EVAL_EXPERIMENT, Tracker
from flows.watch import watched
from schemas.params import EvalParams


def evaluate_checkpoint(
    model_dir: str, params: EvalParams, run_root: str, flow_run_id: str = "none"
) -> dict[str, Any]:
    """Evaluate a prepared model directory as a run of its own (``eval-<hash>``); reruns reuse the stored result
    while the model directory's files, the evaluate stage's code and the stored results are unchanged."""
    body = {"checkpoint": model_dir, "params": params.model_dump(mode="json")}
    run_id = "eval-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    with run_lock(run_root, run_id, wait=True), watched(run_root, run_id):
        return _evaluate(model_dir, params, run_root, run_id, body, flow_run_id)


def _evaluate(model_dir, params, run_root, run_id, body, flow_run_id) -> dict[str, Any]:
    store = RunStore(run_root, run_id)
    manifest = store.create_or_open(body)
    tracker = Tracker(run_root, EVAL_EXPERIMENT)
    inputs = {"checkpoint": model_dir}
    done = None
    if manifest.get("status") == "completed":
        done = store.find_completed(
            "evaluate",
            None,
            inputs,
            params.model_dump(mode="json"),
            code=stage_code("evaluate"),
            fingerprints=fingerprint(inputs),
        )
    if done is None:
        parent = manifest.get("mlflow_run_id") or tracker.start_parent(
            run_id, body, {"stage": "evaluate", "algo": "eval", "prefect.flow_run_id": flow_run_id}
        )
        store.update(status="running", mlflow_run_id=parent)
        ctx = RunContext(
            root=run_root,
            run_id=run_id,
            algo="eval",
            mlflow_parent=parent,
            flow_run_id=flow_run_id,
        )
        try:
            done = run_stage("evaluate", params, inputs, ctx, None)
        except BaseException:
            store.update(status="failed")
            tracker.end(parent, "FAILED")
            raise
        store.update(status="completed")
        tracker.end(parent, "FINISHED")
    return {
        "run_id": run_id,
        "metrics": done.metrics,
        "mlflow_run_id": store.load()["mlflow_run_id"],
        "tracking_uri": tracker.uri,
        "eval_results": done.uri("eval_results"),
    }


@flow(name="turntree-evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, params: EvalParams, run_root: str = "runs") -> dict[str, Any]:
    """Evaluate ``checkpoint`` (a model directory, or 'smollm2' / 'tiny') with ``params``."""
    from prefect.runtime import flow_run

    result = evaluate_checkpoint(prepare_model(checkpoint), params, run_root, str(flow_run.id or "none"))
    get_run_logger().info(
        "evaluation %s: %s", result["run_id"], {k: round(v, 4) for k, v in result["metrics"].items()}
    )
    return result
