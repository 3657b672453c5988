"""The turntree pipeline flow: data → [warm start] → for each iteration: rollout → score → advantages → update
→ evaluate.

Run locally (no server needed; Prefect starts a temporary one):
    turntree run                                  # embedded default: SmolLM2-135M, synthetic tool-arith, GTPO
    turntree run --set algorithm=murphy --set data.sources='["synthetic:func-synth"]'
Deploy (schedule from the Prefect UI): `turntree deploy` registers infra/prefect.yaml's deployments.

By default every stage runs in the pipeline's process (vLLM engine and trainer colocated, the engine reused
across iterations through ``runtime.engines``). ``dispatch`` (``--set dispatch.pools.rollout=gpu``, ``--set
dispatch.default=cpu``) runs stages as flow runs of their own on Prefect work pools instead (``flows.step``):
each loads its model from the stored checkpoint, and the pipeline keeps the run lock while they write.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import State

from flows.flowrun import run_name, tag_flow_run
from flows.health_view import log_health
from flows.locks import run_lock
from flows.notices import notices
from flows.prune import prune_as_it_goes
from flows.runner import RunContext, default_run_id, fingerprint, params_field, source_tags
from flows.runstore import RunStore
from flows.summaries import run_summary_md
from flows.tasks import artifact_key, prepare_model, skipped_stage, stage_runner
from flows.tracking import Tracker
from flows.watch import watched
from schemas.algorithms import ALGORITHMS
from schemas.outputs import StageOutput
from schemas.params import PipelineParams
from stages import STAGES

log = logging.getLogger("turntree.pipeline")


def _call(
    stage: str,
    p: PipelineParams,
    inputs: dict[str, str],
    ctx: RunContext,
    it: int | None,
    upstream: tuple[StageOutput | None, ...] = (),
) -> StageOutput | None:
    """``upstream``: the outputs this stage's inputs came from, passed to the task so that Prefect draws the
    data edges between stages (left out of the cache key: ``inputs`` already names what they hold)."""
    params = getattr(p, params_field(stage)).model_dump(mode="json")
    pool = p.dispatch.pool_for(stage)
    if pool:  # a flow run of its own on that work pool (flows.step)
        from flows.step import StageRequest, dispatch_stage

        req = StageRequest(
            stage=stage, run_id=ctx.run_id, run_root=ctx.root, iteration=it, params=params, inputs=inputs
        )
        return dispatch_stage(req, pool)
    return _output(stage_runner(stage)(*_task_args(stage, params, inputs, ctx, it, upstream)))


def _output(value: StageOutput | State | None) -> StageOutput | None:
    """A stage task's output (a reused stage returns its Cached state, whose data is the output)."""
    return value.result() if isinstance(value, State) else value


def _task_args(stage, params, inputs, ctx, it, upstream) -> tuple:
    """``flows.tasks.stage_task``'s arguments (the upstream outputs last: Prefect's data edges)."""
    ups = [u for u in upstream if u is not None]
    return stage, params, inputs, fingerprint(inputs), ctx.root, ctx.run_id, it, ctx, ups


def _submit(
    stage: str,
    p: PipelineParams,
    inputs: dict[str, str],
    ctx: RunContext,
    it: int | None,
    upstream: tuple[StageOutput | None, ...] = (),
) -> Callable[[], StageOutput | None]:
    """Start a stage beside the flow's next calls (Prefect's task runner: a worker thread; a dispatched stage:
    a thread waiting on its flow run) and return what gives its output."""
    if p.dispatch.pool_for(stage):
        return _in_thread(_call, stage, p, inputs, ctx, it, upstream)
    params = getattr(p, params_field(stage)).model_dump(mode="json")
    future = stage_runner(stage).submit(*_task_args(stage, params, inputs, ctx, it, upstream))
    return lambda: _output(future.result())


def _in_thread(fn: Callable[..., StageOutput | None], *args) -> Callable[[], StageOutput | None]:
    import concurrent.futures
    import contextvars

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="turntree-ahead")
    future = pool.submit(contextvars.copy_context().run, fn, *args)
    pool.shutdown(wait=False)
    return future.result


def start_run(p: PipelineParams) -> tuple[RunStore, RunContext, Tracker]:
    """Create or reopen the run's storage and MLflow parent run."""
    from prefect.runtime import flow_run

    run_id = p.run_id or default_run_id(p)
    store = RunStore(p.run_root, run_id)
    manifest = store.create_or_open(p.identity())
    if store.clean_scratch():  # scratch dirs whose owner process is dead: never read, dropped
        get_run_logger().info("removed unfinished stage outputs of an earlier, killed attempt")
    ctx = RunContext(root=p.run_root, run_id=run_id, algo=p.algorithm, flow_run_id=str(flow_run.id or "none"))
    tracker = Tracker(p.run_root)
    parent = manifest.get("mlflow_run_id")
    if parent:
        tracker.client.update_run(parent, status="RUNNING")
        # the stage runs an earlier, killed attempt left open: those whose process is gone
        why = "a later attempt of this run: the process that ran this stage ended without closing it"
        if tracker.end_stale(tracker.experiment_id, f"tags.mlflow.parentRunId = '{parent}'", why):
            get_run_logger().info("marked the MLflow runs of an earlier, killed attempt's stages KILLED")
    else:
        tags = {
            "algo": p.algorithm,
            "git_sha": ctx.git_sha,
            **source_tags(ctx.git_sha),
            "mlflow.note.content": _description(p, run_id),
            "prefect.flow_run_id": ctx.flow_run_id,
            "stage": "pipeline",
            "turntree.run_id": run_id,
        }
        parent = tracker.start_parent(run_id, p.model_dump(mode="json"), tags)
        tracker.log_dict(parent, p.model_dump(mode="json"), "config.json")
    ctx.mlflow_parent = parent
    store.update(
        status="running",
        mlflow_run_id=parent,
        tracking_uri=tracker.uri,
        prefect_flow_run_id=ctx.flow_run_id,
        driver={"host": socket.gethostname(), "pid": os.getpid()},  # stages record theirs (made_by)
    )
    return store, ctx, tracker


def _description(p: PipelineParams, run_id: str) -> str:
    """The MLflow run's description (shown on its page)."""
    return (
        f"turntree run `{run_id}`: **{p.algorithm}** ({p.advantages.estimator}) on `{p.model}`, data "
        f"{', '.join(p.data.sources)}, {p.iterations} iteration(s) of {p.rollout.problems_per_iteration} problems "
        f"× {p.rollout.group_size} samples; held-out evaluation on `{p.eval.benchmark}` before and after."
    )


def register_final(
    store: RunStore, ctx: RunContext, tracker: Tracker, checkpoint: str, p: PipelineParams
) -> None:
    """Register the final checkpoint as a version of ``turntree-<algorithm>-<base model>`` (once per run), with a
    card that holds its held-out accuracy before -> after, its hyperparameters and data."""
    from flows.cards import registered_name, registry_card

    manifest = store.load()
    if manifest.get("registered_model"):
        return
    made = {
        r["output"]["tables"]["checkpoint"]["uri"]
        for key, e in manifest["stages"].items()
        if key.endswith("/update")
        for r in e["versions"].values()
    }
    if checkpoint not in made:  # every update was skipped: the checkpoint is the starting policy, not trained
        log.warning("no update of run %s produced a checkpoint: nothing registered in MLflow", ctx.run_id)
        return
    name = registered_name(p)
    try:
        card = registry_card(ctx, p, manifest, checkpoint)
        version = tracker.register(name, checkpoint, ctx.mlflow_parent, card, {"turntree.run_id": ctx.run_id})
    except Exception as e:  # the registry is a convenience: a finished run stays finished
        log.warning("could not register the final checkpoint in MLflow: %s", e)
        return
    store.update(registered_model=f"{name}/{version}")


StageCall = Callable[..., StageOutput | None]  # (stage, params, inputs, ctx, iteration, upstream=())
# the same, started beside what follows; returns what gives the output (blocking until the stage is done)
StageSubmit = Callable[..., Callable[[], StageOutput | None]]


def drive(
    params: PipelineParams,
    ctx: RunContext,
    call: StageCall,
    checkpoint: str,
    on_iteration: Callable[[int, dict[str, float]], None] = lambda k, m: None,
    submit: StageSubmit | None = None,
    on_skip: Callable[[str, int, str, StageOutput], None] = lambda stage, k, why, upstream: None,
) -> tuple[str, list[dict]]:
    """The stage sequence, independent of how a stage is called (Prefect task or plain function).

    Returns the final checkpoint and one metrics dict per iteration. An iteration whose samples table is empty
    (every group tied, nothing to learn) skips the update and keeps the checkpoint. The starting policy (after
    the warm start) is evaluated as iteration 0, so the last evaluation compares with it on the same problems.
    With ``max_staleness`` ≥ 1 an iteration's evaluation (but the last's) runs beside the next iteration's stages
    and ``on_iteration`` hears of the iteration when it is done. ``on_skip(stage, iteration, why, upstream)`` hears of a stage the loop skips (the flow draws it as a node).
    """
    summary: list[dict[str, Any]] = []
    data = call("data", params, {}, ctx, STAGES["data"].iteration)
    problems = data.uri("problems") if data else None
    if params.warmstart.enabled and problems:
        ws = call(
            "warmstart",
            params,
            {"problems": problems, "checkpoint": checkpoint},
            ctx,
            STAGES["warmstart"].iteration,
        )
        checkpoint = ws.uri("checkpoint") if ws else checkpoint
    else:
        ws = None
    base = checkpoint

    def eval_inputs() -> dict[str, str]:
        ev_inputs = {"checkpoint": checkpoint}
        if params.eval.benchmark == "heldout" and problems:
            ev_inputs["problems"] = problems
        return ev_inputs

    def evaluate(k: int, ckpt_out: StageOutput | None) -> StageOutput | None:
        return call("evaluate", params, eval_inputs(), ctx, k, upstream=(ckpt_out, data))

    def finish(k: int, done: list[StageOutput]) -> None:
        metrics = {m: v for out in done for m, v in out.metrics.items()}
        summary.append({"iteration": k, **{m: round(v, 4) for m, v in sorted(metrics.items())}})
        on_iteration(k, metrics)

    start = evaluate(0, ws)
    if start:
        summary.append({"iteration": 0, **{m: round(v, 4) for m, v in sorted(start.metrics.items())}})
        on_iteration(0, start.metrics)
    table = ALGORITHMS[params.algorithm].rollout  # the rollout kind: "trajectories" or "trees"
    last_ckpt = ws  # the stage output that wrote the current checkpoint (None: the prepared model)
    version = 0  # the checkpoint's policy version: updates since the starting policy
    ahead: dict[int, Callable[[], StageOutput | None]] = {}  # rollouts started before their iteration
    pending: tuple[int, list[StageOutput], Callable[[], StageOutput | None]] | None = None  # an evaluation
    submit = submit or (lambda *a, **kw: _in_thread(call, *a, **kw))

    def rollout_inputs(k: int) -> dict[str, str]:
        return {
            "problems": problems,
            "checkpoint": checkpoint,
            "iteration": str(k),
            "policy_version": str(version),
        }

    for k in range(1, params.iterations + 1):
        done: list[StageOutput] = []
        roll = scored = adv = upd = None
        if k in ahead:  # generated while update k-1 trained, by the policy before it: 1 version stale
            roll = ahead.pop(k)()
        elif problems:
            roll = call("rollout", params, rollout_inputs(k), ctx, k, upstream=(data, last_ckpt))
        if roll:
            scored_in = {table: roll.uri(table), "problems": problems}
            scored = call("score", params, scored_in, ctx, k, upstream=(roll, data))
        if scored:
            adv = call("advantages", params, {table: scored.uri(table)}, ctx, k, upstream=(scored,))
        if params.max_staleness and problems and k < params.iterations:
            # the next iteration's rollout runs while this update trains, on the weights the engine has
            # (this checkpoint's); its samples are trained one version later, within max_staleness
            ahead[k + 1] = submit(
                "rollout", params, rollout_inputs(k + 1), ctx, k + 1, upstream=(data, last_ckpt)
            )
        if adv and adv.tables["samples"].rows == 0:
            log.warning("iteration %d: no sample carries signal (all groups tied): update skipped", k)
            on_skip("update", k, "no sample carries signal (all groups tied)", adv)
        elif adv:
            upd_inputs = {
                "samples": adv.uri("samples"),
                "checkpoint": checkpoint,
                "policy_version": str(version),
            }
            if params.update.kl_beta > 0:
                upd_inputs["ref_checkpoint"] = base  # KL to the policy RL started from
            upd = call("update", params, upd_inputs, ctx, k, upstream=(adv, last_ckpt))
        if upd:
            checkpoint, last_ckpt, version = upd.uri("checkpoint"), upd, k
        done += [o for o in (roll, scored, adv, upd) if o]
        if pending:  # the last iteration's evaluation ran beside this one's stages: it ends that iteration
            k0, done0, result = pending
            pending = None
            finish(k0, done0 + [ev for ev in [result()] if ev])
        if (params.evaluate_every and k % params.evaluate_every == 0) or k == params.iterations:
            if params.max_staleness and k < params.iterations:  # evaluation does not stall training: this
                # checkpoint is evaluated beside the next iteration's stages (the last one before returning)
                pending = (
                    k,
                    done,
                    submit("evaluate", params, eval_inputs(), ctx, k, upstream=(last_ckpt, data)),
                )
                continue
            done += [ev for ev in [evaluate(k, last_ckpt)] if ev]
        finish(k, done)
    return checkpoint, summary


@flow(name="turntree-pipeline", log_prints=True, flow_run_name=run_name)
def pipeline(params: PipelineParams = PipelineParams()) -> dict[str, Any]:  # Quick run: the defaults
    """Train a policy with GRPO, GTPO or MURPHY from its parameters; returns the run id and final checkpoint.
    Holds the run's lock throughout (``flows.locks``): a second writer of the same run is refused."""
    from flows.preflight import dispatch

    # the pools and their stage steps exist: checked here too for runs started from a deployment, not the CLI
    dispatch(params)
    run_id = params.run_id or default_run_id(params)
    with run_lock(params.run_root, run_id), watched(params.run_root, run_id):
        return _pipeline(params)


def _kept_as_it_stands(params: PipelineParams) -> dict[str, Any] | None:
    """A completed run whose superseded weights were pruned (``turntree prune --weights``) is not driven again:
    a stage that code changes made stale (an evaluation, say) could not read the weights it needs, and the run
    would end failed. Its result as recorded, or None for any other run."""
    store = RunStore(params.run_root, params.run_id or default_run_id(params))
    if not store.exists():
        return None
    m = store.load()
    if m.get("status") != "completed" or not any(p.get("kind") == "weights" for p in m.get("pruned", [])):
        return None
    get_run_logger().info(
        "run %s completed and its superseded weights were pruned (turntree prune --weights): kept as it stands, "
        "no stage recomputed",
        store.run_id,
    )
    return {
        "run_id": store.run_id, "run_dir": store.base, "checkpoint": m.get("final_checkpoint"),
        "mlflow_run_id": m.get("mlflow_run_id"), "tracking_uri": m.get("tracking_uri"), "iterations": [],
    }  # fmt: skip


def _pipeline(params: PipelineParams) -> dict[str, Any]:
    logger = get_run_logger()
    if (kept := _kept_as_it_stands(params)) is not None:
        return kept
    store, ctx, tracker = start_run(params)
    tag_flow_run(ctx, params)
    logger.info("run %s under %s; MLflow: %s", ctx.run_id, store.base, tracker.run_url(ctx.mlflow_parent))

    def table_artifact(k: int, metrics: dict[str, float]) -> None:
        create_table_artifact(
            key=artifact_key(ctx.run_id, "iter", k, "metrics"),
            table=[{"metric": m, "value": round(v, 6)} for m, v in sorted(metrics.items())],
            description=f"run {ctx.run_id}, iteration {k}",
        )
        log_health(tracker, ctx.mlflow_parent, store.load())  # the RL health chart, redrawn
        if params.prune_optimizer_states:
            prune_as_it_goes(params.run_root, ctx.run_id, logger, before=k - params.max_staleness)

    failed = False
    try:
        with notices() as seen, tracker.system_metrics(ctx.mlflow_parent):
            try:
                checkpoint, summary = drive(
                    params, ctx, _call, prepare_model(params.model), table_artifact, _submit, skipped_stage
                )
            except BaseException:  # the manifest first: MLflow's teardown may wait on a stuck lock
                store.update(status="failed")
                failed = True
                raise
    except BaseException:
        if not failed:
            store.update(status="failed")
        tracker.end(ctx.mlflow_parent, "FAILED")
        raise
    if params.prune_optimizer_states:
        prune_as_it_goes(params.run_root, ctx.run_id, logger)
    store.update(status="completed", final_checkpoint=checkpoint)
    register_final(store, ctx, tracker, checkpoint, params)
    tracker.log_dict(ctx.mlflow_parent, store.load(), "manifest.json")
    tracker.end(ctx.mlflow_parent, "FINISHED")
    create_markdown_artifact(
        key=artifact_key(ctx.run_id, "summary"),
        markdown=run_summary_md(ctx, store.load(), store.base, tracker, seen.messages),
        description=f"turntree run {ctx.run_id}",
    )
    return {
        "run_id": ctx.run_id,
        "run_dir": store.base,
        "checkpoint": checkpoint,
        "mlflow_run_id": ctx.mlflow_parent,
        "tracking_uri": tracker.uri,
        "iterations": summary,
    }
