"""Prefect tasks around ``flows.runner``: cached on inputs + task source, results persisted, progress artifacts.

The cache key covers the stage name, its parameters, its inputs (versioned URIs, or fingerprints of model
directories), the run root and run id, and this task's source, so rerunning a pipeline with the same parameters
skips completed stages, and a crashed run resumes from the last completed one. ``ctx`` (MLflow parent id, flow run
id) is left out of the key: it differs between attempts of the same run; so is ``upstream`` (the upstream stage
outputs, passed only so that Prefect draws the data edges; ``inputs`` already names what they hold).
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from flows.runner import RunContext, params_model, run_stage
from flows.runstore import RunStore
from runtime import progress
from schemas.outputs import StageOutput
from stages import stage_spec

STAGE_CACHE = (INPUTS + TASK_SOURCE) - "ctx" - "upstream"


class _ProgressArtifact:
    """Mirror ``runtime.progress`` reports of one stage into a Prefect progress artifact (at most 1 update/s)."""

    def __init__(self, stage: str, key: str):
        self.stage, self.key, self.id, self.last = stage, key, None, 0.0

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        if now - self.last < 1.0 and done < total:
            return
        self.last = now
        pct = 100.0 * done / max(total, 1)
        if self.id is None:
            self.id = create_progress_artifact(progress=pct, key=self.key, description=f"{stage}: {message}")
        else:
            update_progress_artifact(self.id, progress=pct, description=f"{stage}: {message}")


def artifact_key(*parts: object) -> str:
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:100]


@task(cache_policy=STAGE_CACHE, persist_result=True, task_run_name="{stage}[iter={iteration}]")
def stage_task(
    stage: str,
    params: dict,
    inputs: dict[str, str],
    fingerprints: dict[str, str],
    root: str,
    run_id: str,
    iteration: int | None,
    ctx: RunContext,
    upstream: list[StageOutput] | None = None,
) -> StageOutput:
    logger = get_run_logger()
    model = params_model(stage).model_validate(params)
    done = RunStore(root, run_id).find_completed(stage, iteration, inputs, model.model_dump(mode="json"))
    if done is not None:  # committed by an attempt that died before Prefect recorded the task's result
        logger.info("%s: reusing the committed output of an earlier attempt", stage)
        return done
    hook = _ProgressArtifact(stage, artifact_key(run_id, "iter", iteration, stage, "progress"))
    progress.add_hook(hook)
    try:
        out = run_stage(stage, model, inputs, ctx, iteration)
    finally:
        progress.remove_hook(hook)
    logger.info("%s done: %s", stage, {k: f"{v.rows} rows @ {v.uri}" for k, v in out.tables.items()})
    return out


def stage_runner(stage: str):
    """The task to call for ``stage``, with the stage table's retries (I/O-bound stages only)."""
    retries = stage_spec(stage).retries
    if retries:
        return stage_task.with_options(retries=retries, retry_delay_seconds=2)
    return stage_task


@task(retries=2, retry_delay_seconds=5, task_run_name="prepare-model[{spec}]")
def prepare_model(spec: str) -> str:
    from runtime.models import resolve_model

    return str(resolve_model(spec))
