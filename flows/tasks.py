"""Prefect tasks around ``flows.runner``: cached on what the run manifest says is reusable, results persisted,
progress artifacts.

The run manifest decides what is reused, not Prefect: the cache key is computed from the version
``RunStore.find_completed`` picks for the stage's inputs (content fingerprints of model directories), parameters
and code (``flows.integrity.code_hash``: the stage's module and every project module it imports), after checking
that version's files against their recorded sha256 and size. With no such version the key is None (no cache
lookup), so a Prefect cache hit can only ever return a verified, current output; a truncated or altered output, an
edited stage module, new weights in a model directory, or a newer version written by ``turntree stage`` all lead
past the cache. ``ctx`` (MLflow parent id, flow run id) and ``upstream`` (the upstream stage outputs, passed only
so that Prefect draws the data edges; ``inputs`` already names what they hold) are not part of the key.

Retries (the stage table's ``retries``) happen only on transient I/O errors, never on configuration errors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Completed, State

from flows.runner import RunContext, params_model, run_stage, stage_code
from flows.runstore import RunStore
from runtime import progress
from schemas.outputs import StageOutput
from stages import stage_spec


def reusable(stage: str, params: dict, inputs: dict, fingerprints: dict, root: str, run_id: str, iteration):
    """The committed, verified output this call may reuse (``RunStore.find_completed``), or None. ``params``:
    the stage's validated parameters as dumped by the pipeline (validated once, with ``PipelineParams``)."""
    return RunStore(root, run_id).find_completed(
        stage,
        iteration,
        inputs,
        params,
        code=stage_code(stage),
        fingerprints=fingerprints,
    )


def stage_cache_key(task_ctx, args: dict) -> str | None:
    """Key of the verified version the manifest would reuse; None (no cache) when there is none."""
    try:
        done = reusable(
            *(args[k] for k in ("stage", "params", "inputs", "fingerprints", "root", "run_id")),
            args["iteration"],
        )
    except Exception:  # noqa: BLE001 - an unreadable manifest: no cache, the task itself reports it
        return None
    if done is None:
        return None
    body = [args["stage"], args["iteration"], args["root"], args["run_id"], done.model_dump(mode="json")]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _ProgressArtifact:
    """Mirror ``runtime.progress`` reports of one stage into a Prefect progress artifact (at most 1 update/s)."""

    def __init__(self, stage: str, key: str):
        self.stage, self.key, self.id, self.last = stage, key, None, 0.0

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if stage != self.stage:  # another stage running beside this one (max_staleness ≥ 1)
            return
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


@task(cache_key_fn=stage_cache_key, persist_result=True, task_run_name="{stage}[iter={iteration}]")
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
    done = reusable(stage, params, inputs, fingerprints, root, run_id, iteration)
    if done is not None:  # committed (and verified just now) but not in Prefect's cache under this key
        logger.info("%s: reusing the verified committed output %s", stage, sorted(done.tables))
        return Completed(name="Cached", message="reused the run's verified committed output", data=done)
    hook = _ProgressArtifact(stage, artifact_key(run_id, "iter", iteration, stage, "progress"))
    progress.add_hook(hook)
    progress.begin(stage)
    try:
        out = run_stage(stage, model, inputs, ctx, iteration)
    finally:
        progress.end(stage)
        progress.remove_hook(hook)
    logger.info("%s done: %s", stage, {k: f"{v.rows} rows @ {v.uri}" for k, v in out.tables.items()})
    return out


@task(task_run_name="{stage}[iter={iteration}]")
def skipped_stage(stage: str, iteration: int, why: str, upstream: StageOutput | None = None) -> State:
    """A node in the flow's graph for a stage the pipeline skipped (its state is named Skipped, its message says
    why), drawn after the output that made it skip."""
    get_run_logger().warning("%s of iteration %d skipped: %s", stage, iteration, why)
    return Completed(name="Skipped", message=why)


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNO = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def transient(exc: BaseException | None) -> bool:
    """Worth retrying: an OSError that is not about a missing/forbidden path or a full/read-only disk."""
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, _PERMANENT)
        and getattr(exc, "errno", None) not in _PERMANENT_ERRNO
    )


EX_TEMPFAIL = 75  # sysexits.h: a transient failure, worth retrying


def exit_code(exc: BaseException | None) -> int:
    """What a failed stage job exits with, for an orchestrator to act on: 2 bad input (the stage refused its
    inputs or parameters before computing: missing inputs, bad samples, an unusable checkpoint, a corrupt
    stored table), 75 transient (connection or rendezvous timeouts, I/O errors that may pass, CUDA out of
    memory): retry, else 1."""
    from flows.integrity import IntegrityError
    from runtime.checkpoint import CheckpointError

    if isinstance(exc, KeyError | IntegrityError | CheckpointError) or type(exc).__name__ == "SamplesError":
        return 2
    if transient(exc) or isinstance(exc, TimeoutError) or type(exc).__name__ == "OutOfMemoryError":
        return EX_TEMPFAIL
    return 1


def retry_on_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the task's own exception, re-raised by result()
        return transient(e)
    return False


def stage_runner(stage: str):
    """The task to call for ``stage``, with the stage table's retries (transient I/O errors only)."""
    retries = stage_spec(stage).retries
    if retries:
        return stage_task.with_options(
            retries=retries, retry_delay_seconds=2, retry_condition_fn=retry_on_transient
        )
    return stage_task


@task(
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on_transient,
    task_run_name="prepare-model[{spec}]",
)
def prepare_model(spec: str) -> str:
    from runtime.models import resolve_model

    return str(resolve_model(spec))
