"""Each stage a step of its own: the stage-step flow a work pool runs, and the pipeline's side that dispatches
to it (the Kubeflow-like contract on Prefect alone).

``stage_step`` (flow ``turntree-stage-step``, deployed once per work pool as ``step-<pool>`` by ``turntree
deploy --pool <pool>``) runs ONE stage of a run from typed inputs, a ``StageRequest`` (stage, run, iteration,
the stage's parameters, its input refs), as the stage's next committed version in the run store, or reuses the
verified committed version made from the same inputs, parameters and code (as in-process). It writes only while
the pipeline that dispatched it holds the run lock under the token it was given (``flows.locks.authorised``).

``dispatch_stage`` (called by ``flows.pipeline`` for a stage that ``PipelineParams.dispatch`` puts on a pool)
reuses a verified committed version without starting anything, else runs the deployment as a subflow of the
pipeline's flow run, waits for it, and reads the StageOutput back from the run manifest (the version made
from these inputs, parameters and code, its files checked against their sha256), never from the flow run's
pickled result. A flow run that does not complete fails the pipeline with the stage and the flow run named.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from flows.locks import authorised, held_token
from flows.runner import RunContext, fingerprint, params_model, run_stage
from flows.runstore import RunStore, stage_key
from flows.tasks import reusable
from flows.watch import watched
from runtime import watchdog
from schemas.outputs import StageOutput
from schemas.params import DispatchParams, StageName

FLOW = "turntree-stage-step"


class StageRequest(BaseModel):
    """A stage step's typed inputs: which stage of which run, its parameters and its input refs."""

    stage: StageName
    run_id: str
    run_root: str = Field(description="the run store root, shared with the pipeline (a path or s3://…)")
    iteration: int | None = Field(None, description="the iteration of a per-iteration stage")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's parameters")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="input name -> stored table or directory"
    )


class StageDispatchError(RuntimeError):
    """A dispatched stage's flow run did not complete, or left no committed output."""


def _find(req: StageRequest) -> StageOutput | None:
    return reusable(
        req.stage, req.params, req.inputs, fingerprint(req.inputs), req.run_root, req.run_id, req.iteration
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    req = flow_run.parameters.get("request") or {}
    req = req if isinstance(req, dict) else req.model_dump()
    return f"{req.get('run_id')}/{stage_key(req.get('stage'), req.get('iteration'))}"


@flow(name=FLOW, log_prints=True, flow_run_name=_run_name)
def stage_step(request: StageRequest, lock_token: str | None = None) -> dict[str, Any]:
    """Run one stage from ``request`` as its next committed version (or reuse the verified one made from the
    same inputs, parameters and code). ``lock_token``: given by the pipeline that holds the run lock."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    req = request
    with authorised(req.run_root, req.run_id, lock_token), watched(req.run_root, req.run_id):
        store = RunStore(req.run_root, req.run_id)
        manifest = store.load()
        done = _find(req)
        if done is not None:
            logger.info("%s: reusing the verified committed output %s", req.stage, sorted(done.tables))
            out = done
        else:
            ctx = RunContext(
                root=req.run_root,
                run_id=req.run_id,
                algo=manifest["params"].get("algorithm", "?"),
                mlflow_parent=manifest.get("mlflow_run_id"),
                flow_run_id=str(flow_run.id or "none"),
            )
            params = params_model(req.stage).model_validate(req.params)
            out = run_stage(req.stage, params, req.inputs, ctx, req.iteration)
        version = store.load()["stages"][stage_key(req.stage, req.iteration)]["current"]
    return {
        "stage": req.stage,
        "iteration": req.iteration,
        "version": version,
        "reused": done is not None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "output": out.model_dump(mode="json"),
    }


def dispatch_stage(request: StageRequest, pool: str) -> StageOutput:
    """Run ``request`` as a flow run of the stage-step deployment on ``pool`` (a subflow of the calling flow
    run) and return the StageOutput the run manifest records for it."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    done = _find(request)
    if done is not None:
        logger.info("%s: reusing the verified committed output (nothing dispatched)", request.stage)
        return done
    where = stage_key(request.stage, request.iteration)
    token = held_token(request.run_root, request.run_id)
    with watchdog.suspended():  # the work (and its own watchdog) is in the worker's process
        run = run_deployment(
            DispatchParams.deployment(pool),
            parameters={"request": request.model_dump(mode="json"), "lock_token": token},
            flow_run_name=f"{request.run_id}/{where}",
            timeout=None,
            poll_interval=2,
            tags=[f"run:{request.run_id}", f"stage:{request.stage}"],
        )
    state = run.state
    if state is None or not state.is_completed():
        why = (state.message if state else None) or "no message"
        raise StageDispatchError(
            f"stage {where} failed in flow run {run.name!r} ({run.id}) on work pool {pool!r}: "
            f"{state.name if state else 'no state'}: {why}"
        )
    out = _find(request)
    if out is None:
        raise StageDispatchError(
            f"stage {where}: flow run {run.name!r} ({run.id}) on work pool {pool!r} completed but the run "
            f"store has no verified version of it for these inputs, parameters and code (does the worker run "
            f"the same code and see the same run root {request.run_root}?)"
        )
    logger.info("%s done in flow run %s on pool %s", where, run.name, pool)
    return out
