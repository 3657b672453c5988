"""The turntree pipeline flow: data → [warm start] → for each iteration: rollout → score → advantages → update
→ evaluate.

Run locally (no server needed; Prefect starts a temporary one):
    turntree run                                  # embedded default: SmolLM2-135M, synthetic tool-arith, GTPO
    turntree run --set algorithm=murphy --set data.sources='["synthetic:func-synth"]'
Deploy (schedule from the Prefect UI): `turntree deploy` registers infra/prefect.yaml's deployments.

Simplifications: everything runs in one process (vLLM engine and trainer colocated, the engine reused across
iterations through ``runtime.engines``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.locks import run_lock
from flows.runner import RunContext, default_run_id, fingerprint, params_field
from flows.runstore import RunStore
from flows.tasks import artifact_key, prepare_model, stage_runner
from flows.tracking import Tracker
from schemas.algorithms import ALGORITHMS
from schemas.outputs import StageOutput
from schemas.params import PipelineParams
from stages import STAGES

log = logging.getLogger("turntree.pipeline")


def _call(
    stage: str, p: PipelineParams, inputs: dict[str, str], ctx: RunContext, it: int | None
) -> StageOutput | None:
    params = getattr(p, params_field(stage)).model_dump(mode="json")
    return stage_runner(stage)(stage, params, inputs, fingerprint(inputs), ctx.root, ctx.run_id, it, ctx)


def start_run(p: PipelineParams) -> tuple[RunStore, RunContext, Tracker]:
    """Create or reopen the run's storage and MLflow parent run."""
    from prefect.runtime import flow_run

    run_id = p.run_id or default_run_id(p)
    store = RunStore(p.run_root, run_id)
    manifest = store.create_or_open(p.model_dump(mode="json", exclude={"run_id"}))
    if store.clean_scratch():  # scratch dirs whose owner process is dead: never read, dropped
        get_run_logger().info("removed unfinished stage outputs of an earlier, killed attempt")
    ctx = RunContext(root=p.run_root, run_id=run_id, algo=p.algorithm, flow_run_id=str(flow_run.id or "none"))
    tracker = Tracker(p.run_root)
    parent = manifest.get("mlflow_run_id")
    if parent:
        tracker.client.update_run(parent, status="RUNNING")
    else:
        tags = {
            "algo": p.algorithm,
            "git_sha": ctx.git_sha,
            "prefect.flow_run_id": ctx.flow_run_id,
            "stage": "pipeline",
            "turntree.run_id": run_id,
        }
        parent = tracker.start_parent(run_id, p.model_dump(mode="json"), tags)
        tracker.log_dict(parent, p.model_dump(mode="json"), "config.json")
    ctx.mlflow_parent = parent
    store.update(
        status="running", mlflow_run_id=parent, tracking_uri=tracker.uri, prefect_flow_run_id=ctx.flow_run_id
    )
    return store, ctx, tracker


StageCall = Callable[[str, PipelineParams, dict[str, str], RunContext, int | None], StageOutput | None]


def drive(
    params: PipelineParams,
    ctx: RunContext,
    call: StageCall,
    checkpoint: str,
    on_iteration: Callable[[int, dict[str, float]], None] = lambda k, m: None,
) -> tuple[str, list[dict]]:
    """The stage sequence, independent of how a stage is called (Prefect task or plain function).

    Returns the final checkpoint and one metrics dict per iteration. An iteration whose samples table is empty
    (every group tied, nothing to learn) skips the update and keeps the checkpoint.
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
    base = checkpoint
    table = ALGORITHMS[params.algorithm].rollout  # the rollout kind: "trajectories" or "trees"
    for k in range(1, params.iterations + 1):
        done: list[StageOutput] = []
        roll = scored = adv = upd = None
        if problems:
            roll = call(
                "rollout",
                params,
                {"problems": problems, "checkpoint": checkpoint, "iteration": str(k)},
                ctx,
                k,
            )
        if roll:
            scored = call("score", params, {table: roll.uri(table), "problems": problems}, ctx, k)
        if scored:
            adv = call("advantages", params, {table: scored.uri(table)}, ctx, k)
        if adv and adv.tables["samples"].rows == 0:
            log.warning("iteration %d: no sample carries signal (all groups tied): update skipped", k)
        elif adv:
            upd_inputs = {"samples": adv.uri("samples"), "checkpoint": checkpoint}
            if params.update.kl_beta > 0:
                upd_inputs["ref_checkpoint"] = base  # KL to the policy RL started from
            upd = call("update", params, upd_inputs, ctx, k)
        if upd:
            checkpoint = upd.uri("checkpoint")
        done += [o for o in (roll, scored, adv, upd) if o]
        due = params.evaluate_every and k % params.evaluate_every == 0
        if due or k == params.iterations:
            ev_inputs = {"checkpoint": checkpoint}
            if params.eval.benchmark == "heldout" and problems:
                ev_inputs["problems"] = problems
            ev = call("evaluate", params, ev_inputs, ctx, k)
            done += [ev] if ev else []
        metrics = {m: v for out in done for m, v in out.metrics.items()}
        summary.append({"iteration": k, **{m: round(v, 4) for m, v in sorted(metrics.items())}})
        on_iteration(k, metrics)
    return checkpoint, summary


@flow(name="turntree-pipeline", log_prints=True)
def pipeline(params: PipelineParams) -> dict[str, Any]:
    """Train a policy with GRPO, GTPO or MURPHY from its parameters; returns the run id and final checkpoint.
    Holds the run's lock throughout (``flows.locks``): a second writer of the same run is refused."""
    with run_lock(params.run_root, params.run_id or default_run_id(params)):
        return _pipeline(params)


def _pipeline(params: PipelineParams) -> dict[str, Any]:
    logger = get_run_logger()
    store, ctx, tracker = start_run(params)
    logger.info("run %s under %s; MLflow: %s", ctx.run_id, store.base, tracker.run_url(ctx.mlflow_parent))

    def table_artifact(k: int, metrics: dict[str, float]) -> None:
        create_table_artifact(
            key=artifact_key(ctx.run_id, "iter", k, "metrics"),
            table=[{"metric": m, "value": round(v, 6)} for m, v in sorted(metrics.items())],
            description=f"run {ctx.run_id}, iteration {k}",
        )

    try:
        checkpoint, summary = drive(params, ctx, _call, prepare_model(params.model), table_artifact)
    except BaseException:
        store.update(status="failed")
        tracker.end(ctx.mlflow_parent, "FAILED")
        raise
    store.update(status="completed", final_checkpoint=checkpoint)
    tracker.log_dict(ctx.mlflow_parent, store.load(), "manifest.json")
    tracker.end(ctx.mlflow_parent, "FINISHED")
    create_markdown_artifact(
        key=artifact_key(ctx.run_id, "summary"),
        markdown=_summary_md(ctx, store, tracker, summary),
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


def _summary_md(ctx: RunContext, store: RunStore, tracker, summary: list[dict[str, Any]]) -> str:
    lines = [
        f"# turntree run `{ctx.run_id}`",
        "",
        f"- algorithm: **{ctx.algo}**",
        f"- storage: `{store.base}`",
        f"- MLflow: {tracker.run_url(ctx.mlflow_parent)}",
        f"- git: `{ctx.git_sha}`",
        "",
    ]
    keys = [
        k
        for k in ("reward/mean", "adv/zero_signal_frac", "actor/loss", "actor/clip_frac")
        if any(k in s for s in summary)
    ]
    evals = sorted(
        {k for s in summary for k in s if k.startswith("eval/") and "pass_at_1_iter" in k and "_ci_" not in k}
    )
    cols = ["iteration", *keys, *evals]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        lines.append("| " + " | ".join(str(s.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
