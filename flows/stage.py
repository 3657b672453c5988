"""Rerun one named stage of an existing run from that run's stored inputs.

    turntree stage score --run gtpo-1a2b3c4d5e --iter 1 [--set shaping_alpha=0.3]

The rerun reads the inputs recorded for the stage's current version in the run manifest, each stored table at
its stage's *current* version (or the version ``--pin KEY=vN`` names) (so ``stage score`` then ``stage advantages`` builds advantages on the new score),
deep-merges the parameter overrides into the recorded parameters, writes the next version (``v2``, ``v3``…),
marks it current and records the overrides with it. No other stage's output is touched; downstream stages keep
reading what they read before until they are rerun (``RunStore.stale_stages`` names them; the pipeline's next
run recomputes them from the current versions and keeps every rerun's own version). The MLflow child run is
linked to the run's parent with the ``mlflow.parentRunId`` tag, even when the parent finished long ago, named
``iter-k/<stage> vN`` and tagged with its version and overrides. The Prefect flow run is named
``<run>/iter-k/<stage> vN`` and tagged ``run:<run>``; the pipeline's flow run gets a "reruns" artifact listing
every rerun of the run with a link to each.
"""

from __future__ import annotations

import json
import logging
from typing import Any, get_args

from prefect import flow, get_run_logger

from flows.locks import run_lock
from flows.runner import RunContext, run_stage, stage_params
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
    pins: dict[str, str] | None = None,
) -> dict[str, Any]:
    with run_lock(root, run_id), watched(root, run_id):  # re-entrant: the CLI already holds both
        return _rerun(root, run_id, stage, iteration, overrides, flow_run_id, pins)


def _rerun(root, run_id, stage, iteration, overrides, flow_run_id, pins=None) -> dict[str, Any]:
    store = RunStore(root, run_id)
    manifest = store.load()
    record = store.stage_record(stage, iteration)
    params = stage_params(stage, record["params"], overrides)
    inputs, moved = store.current_inputs(record["inputs"], pins)  # a chain of reruns builds on each other
    ctx = RunContext(
        root=root,
        run_id=run_id,
        algo=manifest["params"].get("algorithm", "?"),
        mlflow_parent=manifest.get("mlflow_run_id"),
        flow_run_id=flow_run_id,
    )
    tags = {"turntree.rerun": "true", "turntree.overrides": json.dumps(overrides or {}, sort_keys=True)}
    out = run_stage(stage, params, inputs, ctx, iteration, tags=tags)
    store.note_current(stage, iteration, overrides=overrides or {}, rebased_inputs=moved)
    key = _key(stage, iteration)
    return {
        "run_id": run_id,
        "stage": stage,
        "iteration": iteration,
        "key": key,
        "version": store.load()["stages"][key]["current"],
        "overrides": overrides or {},
        "read": {name: _where(store, uri) for name, uri in inputs.items()},
        "rebased_inputs": moved,
        "stale": store.stale_stages(),
        "output": out.model_dump(mode="json"),
    }


def _where(store: RunStore, uri: Any) -> str:
    """``iter-1/score v2`` for a stored table, else the value itself (a model name, a number)."""
    hit = store.recorded_ref(uri) if isinstance(uri, str) else None
    return f"{hit[0]} {hit[1]}" if hit else str(uri)


def _key(stage: str, iteration: int | None) -> str:
    from flows.runstore import stage_key

    return stage_key(stage, iteration)


def rerun_name() -> str:
    """The rerun's flow run name, ``<run>/iter-k/<stage> vN`` (the version it is about to write)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters
    key = _key(p["stage"], p.get("iteration"))
    try:
        version = RunStore(p.get("run_root", "runs"), p["run_id"]).next_version(
            p["stage"], p.get("iteration")
        )
    except Exception:  # a missing run: the flow itself says so in one line
        version = "rerun"
    return f"{p['run_id']}/{key} {version}"


def _show_in_prefect(root: str, run_id: str, result: dict[str, Any], flow_run_id: str) -> None:
    """Tag this flow run with its run and stage, and list the run's reruns (with links) in an artifact of the
    pipeline's flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    from flows.console import prefect_ui
    from flows.tasks import artifact_key

    manifest = RunStore(root, run_id).load()
    ui = prefect_ui()

    def link(rec: dict[str, Any]) -> str:
        fr = rec.get("made_by", {}).get("flow_run_id")
        return f"[flow run]({ui}/runs/flow-run/{fr})" if ui and fr and fr != "none" else ""

    rows = [
        f"| `{key}` | {v} | `{json.dumps(rec['overrides'], sort_keys=True)}` | {link(rec)} |"
        for key, entry in sorted(manifest["stages"].items())
        for v, rec in sorted(entry["versions"].items(), key=lambda kv: int(kv[0][1:]))
        if "overrides" in rec
    ]
    head = [
        f"# Reruns of run `{run_id}`",
        "",
        "| stage | version | overrides | Prefect |",
        "|---|---|---|---|",
    ]
    md = "\n".join(head + rows)
    tags = [f"run:{run_id}", f"stage:{result['key']}", "rerun"]
    try:
        with get_client(sync_client=True) as client:
            if flow_run_id != "none":
                current = client.read_flow_run(flow_run_id).tags or []
                client.update_flow_run(flow_run_id, tags=sorted({*current, *tags}))
            pipeline_run = manifest.get("prefect_flow_run_id")
            try:  # on this server (a CLI run's temporary server is gone): attach the list to it
                client.read_flow_run(pipeline_run)
            except Exception:
                pipeline_run = None
            client.create_artifact(
                ArtifactCreate(
                    key=artifact_key(run_id, "reruns"),
                    type="markdown",
                    data=md,
                    description=f"reruns of turntree run {run_id}",
                    flow_run_id=pipeline_run,
                )
            )
    except Exception as e:  # tags and artifacts are a convenience: the rerun itself is done
        logging.getLogger("turntree.stage").warning("could not show the rerun in Prefect: %s", e)


@flow(name="turntree-stage", log_prints=True, flow_run_name=rerun_name)
def stage_flow(
    run_id: str,
    stage: StageName,
    iteration: int | None = None,
    overrides: dict[str, Any] | None = None,
    run_root: str = "runs",
    pins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Rerun ``stage`` (of ``iteration``, when the stage is per-iteration) of run ``run_id``; ``pins``: an
    input stage's version to read instead of its current one, e.g. ``{"iter-1/score": "v1"}``."""
    from prefect.runtime import flow_run

    fr = str(flow_run.id or "none")
    result = rerun(run_root, run_id, stage, iteration, overrides, flow_run_id=fr, pins=pins)
    get_run_logger().info("stage %s of run %s rerun as %s", stage, run_id, result["version"])
    _show_in_prefect(run_root, run_id, result, fr)
    return result
