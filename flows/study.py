"""`turntree study`: a grid of methods × seeds (× any parameter) as one Prefect flow, one pipeline run per cell.

Run locally (Prefect starts a temporary server; MLflow as for `turntree run`):
    turntree study --config configs/studies/smoke.yaml [--root runs] [--out reports/studies/smoke]
Not among `turntree deploy`'s deployments: a study starts from the command line (its cells' stages can still be
dispatched to work pools through ``base.dispatch``). Rerunning the same command resumes: each cell is the same run id (``<study>-<method>[-<grid point>]-s<seed>``),
so the pipeline reuses every stage it completed; a crashed study picks up where it stopped.

The study flow runs each cell as a task whose pipeline flow (``flows.pipeline.pipeline``) is a subflow, one
after another, or ``concurrency`` at once, each in a process of its own (Prefect's process pool: the pipeline
keeps one live inference engine per process). A failed cell does not stop the others; the report is written
from the cells that completed and the command exits 1. Reading back (``gather``) turns each run's manifest into
a ``stages.study.CellResult``; ``stages.study`` writes the report. MLflow: a study run (tag ``stage=study``,
``turntree.study=<name>``) with the report, plot and summary metrics, and each cell's pipeline run nested under
it (``mlflow.parentRunId``, ``turntree.study``, ``turntree.cell``).

Simplifications: a study's MLflow run is found again by the study's name and a hash of its file (concurrency
left out), so editing the study file starts a new one; cells run on this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from flows.provenance import git_sha
from flows.runstore import RunStore
from flows.tasks import artifact_key
from flows.tracking import Tracker, writer_tags
from schemas.params import PipelineParams, StudyParams
from stages.study import CellResult, report
from stages.study.plan import Cell, cells


@task(name="study-cell", cache_policy=NONE, task_run_name="{params.run_id}")
def run_cell(params: PipelineParams, prune: bool = True, prune_weights: bool = False) -> dict[str, Any]:
    """One cell: the pipeline as a subflow (it resumes a run that exists), with ``prune``: its superseded optimizer
    states dropped as it runs and when it ends (``prune_optimizer_states``, ``flows.prune``; a running SmolLM2 cell
    holds ~1.6 GB per iteration otherwise); with ``prune_weights``, once it completes, its superseded weights too.
    Never raises, so the other cells run (a failed prune costs disk space: a warning)."""
    from flows.integrity import is_local
    from flows.pipeline import pipeline
    from flows.prune import prune_run

    if prune:
        params = params.model_copy(update={"prune_optimizer_states": True})
    state = pipeline(params, return_state=True)
    if prune_weights and state.is_completed() and is_local(params.run_root):
        try:
            get_run_logger().info(prune_run(params.run_root, params.run_id, weights=True, optimizer=prune).summary())
        except Exception as e:  # noqa: BLE001 - disk space is not worth the study
            get_run_logger().warning("cell %s: superseded weights not pruned: %s", params.run_id, e)
    return {"run_id": params.run_id, "completed": state.is_completed(), "message": str(state.message or "")}


def gather(cell: Cell) -> CellResult:
    """What the cell's run stored: per-iteration metrics, evaluations, sampled completions, shared inputs."""
    from flows.console import iteration_metrics

    p = cell.params
    res = CellResult(
        run_id=cell.run_id, method=cell.method, algorithm=cell.algorithm, seed=cell.seed, point=cell.point,
        status="not started", planned=cell.planned, iterations=p.iterations,
    )  # fmt: skip
    store = RunStore(p.run_root, cell.run_id)
    if not store.exists():
        return res
    manifest = store.load()
    res.status, res.mlflow_run_id = manifest.get("status", "?"), manifest.get("mlflow_run_id")
    res.metrics = iteration_metrics(manifest)
    data = store.current_output("data", None)
    res.problems_sha256 = data.tables["problems"].sha256 if data else None
    ws = store.current_output("warmstart", 0)
    res.warmstart_sha256 = ws.tables["checkpoint"].sha256 if ws else None
    for k in range(p.iterations + 1):
        ev = store.current_output("evaluate", k)
        if ev and "eval_results" in ev.tables:
            res.evals[k] = ev.uri("eval_results")
        roll = store.current_output("rollout", k) if k else None
        if roll and "trajectories" in roll.tables:
            res.completions[k] = roll.tables["trajectories"].rows
        elif roll:
            res.completions[k] = int(roll.metrics.get("rollout/nodes", 0))
    return res


def _study_run(tracker: Tracker, study: StudyParams, name: str, flow_run_id: str) -> str:
    """The study's MLflow run: the one of this study file (same name and contents) when it exists."""
    body = study.model_dump(mode="json", by_alias=True)
    how = ("concurrency", "keep_optimizer_states", "prune_weights")  # how cells run and are stored: not what it is
    what = {k: v for k, v in body.items() if k not in how}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.stage = 'study' and tags.`turntree.study` = '{name}' "
        f"and tags.`turntree.study_hash` = '{digest}'",
        max_results=1,
    )
    # another grid's run of this study name still RUNNING whose process is gone was killed (ended KILLED;
    # reopened if that grid runs again); this grid's own run is reopened below
    stale = f"tags.stage = 'study' and tags.`turntree.study` = '{name}' and tags.`turntree.study_hash` != "
    why = "a later run of this study: its process ended without closing it"
    tracker.end_stale(tracker.experiment_id, f"{stale}'{digest}'", why)
    if found:
        run = found[0].info.run_id
        tracker.client.update_run(run, status="RUNNING")
        tracker.set_tags(run, writer_tags())
        return run
    tags = {
        "stage": "study",
        "turntree.study": name,
        "turntree.study_hash": digest,
        "algo": ",".join(m.name for m in study.methods),
        "git_sha": git_sha(),
        "prefect.flow_run_id": flow_run_id,
        **writer_tags(),
    }
    run = tracker.start_parent(f"study-{name}", body, tags)
    tracker.log_dict(run, body, "study.json")
    return run


def _link(tracker: Tracker, parent: str, res: CellResult, name: str) -> None:
    """Nest the cell's pipeline run under the study's run in MLflow."""
    if not res.mlflow_run_id:
        return
    tags = {
        "mlflow.parentRunId": parent, "turntree.study": name, "turntree.cell": res.run_id,
        "turntree.method": res.method, "turntree.seed": str(res.seed),
    }  # fmt: skip
    for k, v in tags.items():
        tracker.client.set_tag(res.mlflow_run_id, k, v)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"study-{flow_run.parameters.get('name', '?')}"


def _run_and_report(study, name, todo: list[Cell], tracker: Tracker, parent: str, out: str, command: str):
    logger = get_run_logger()
    outcomes: dict[str, dict[str, Any]] = {}
    if study.concurrency == 1:
        for i, c in enumerate(todo, 1):
            logger.info("cell %d/%d: %s", i, len(todo), c.run_id)
            outcomes[c.run_id] = run_cell(c.params, not study.keep_optimizer_states, study.prune_weights)
    else:  # a cell whose process died is reported as its manifest left it
        futures = {c.run_id: run_cell.submit(c.params, not study.keep_optimizer_states, study.prune_weights) for c in todo}
        for rid, f in futures.items():
            got = f.result(raise_on_failure=False)
            outcomes[rid] = got if isinstance(got, dict) else {"completed": False, "message": str(got)}
    results = [gather(c) for c in todo]
    for res in results:
        _link(tracker, parent, res, name)
        if not outcomes.get(res.run_id, {}).get("completed"):
            logger.warning(
                "cell %s: %s", res.run_id, outcomes.get(res.run_id, {}).get("message") or res.status
            )
    result = report(results, Path(out), name=name, bootstrap=study.bootstrap, command=command)
    tracker.log_metrics(parent, result.metrics, 0)
    for ref in result.tables.values():
        tracker.log_artifact(parent, ref.uri, "report")
    return results, result


@flow(name="turntree-study", log_prints=True, flow_run_name=_flow_run_name)
def study_flow(study: StudyParams, name: str, run_root: str, out: str, command: str = "") -> dict[str, Any]:
    """Run every cell of ``study`` (resuming those that exist), then write its report to ``out``."""
    from prefect.runtime import flow_run

    todo = cells(study, name, run_root)
    tracker = Tracker(todo[0].params.run_root)
    parent = _study_run(tracker, study, name, str(flow_run.id or "none"))
    try:
        results, result = _run_and_report(study, name, todo, tracker, parent, out, command)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    failed = [r.run_id for r in results if not r.completed]
    tracker.end(parent, "FAILED" if failed else "FINISHED")
    md = Path(result.uri("report"))
    create_markdown_artifact(
        key=artifact_key("study", name), markdown=md.read_text(), description=f"turntree study {name}"
    )
    return {
        "report": str(md),
        "files": {k: v.uri for k, v in result.tables.items()},
        "mlflow_run_id": parent,
        "tracking_uri": tracker.uri,
        "cells": {r.run_id: r.status for r in results},
        "failed": failed,
        "metrics": result.metrics,
    }


def run_study(
    study: StudyParams, name: str, root: str, out: str, config: str, sets: list[str], wait: bool
) -> int:
    """`turntree study` after its checks: the study flow (with ``concurrency`` > 1 its cells go to a pool of that
    many processes) under the study's lock, then the report printed; returns the exit status (``finish``)."""
    from flows.console import progress_display
    from flows.locks import run_lock

    command = " ".join(["turntree study --config", config, *(f"--set '{s}'" for s in sets), "--root", root])
    fl = study_flow
    if study.concurrency > 1:
        from prefect.task_runners import ProcessPoolTaskRunner

        fl = study_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=study.concurrency))
    lock_root = cells(study, name, root)[0].params.run_root
    with run_lock(lock_root, f"study-{name}", wait=wait), progress_display(), one_server(study.concurrency):
        state = fl(study, name, root, out, f"{command} --out {out}", return_state=True)
    return finish(state)


@contextlib.contextmanager
def one_server(concurrency: int) -> Iterator[None]:
    """With cells in processes of their own, every process talks to the same Prefect server (so each cell's
    pipeline is a subflow of the study in one UI): the configured one, exported to the children, or a temporary
    one (``flows.prefect_local``; without it each child would start a temporary server of its own)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if concurrency <= 1:
        yield
        return
    from flows.prefect_local import start_local_server

    saved = os.environ.get("PREFECT_API_URL")
    # `turntree study` has started it already; None from start_local_server: only the environment names one
    url = PREFECT_API_URL.value() or start_local_server() or saved
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


def report_now(study: StudyParams, name: str, root: str, out: str, command: str) -> int:
    """`turntree study --report-only`: the report of the cells as they stand (completed ones compared; the others
    listed with their status), written to ``out`` and printed; no cell runs, no lock is taken."""
    results = [gather(c) for c in cells(study, name, root)]
    result = report(results, Path(out), name=name, bootstrap=study.bootstrap, command=command)
    print(Path(result.uri("report")).read_text())
    done = sum(r.completed for r in results)
    print(f"report: {result.uri('report')} ({done} of {len(results)} cells completed)")
    return 0


def finish(state) -> int:
    """Print the report (or why there is none); exit status 0 when every cell completed, else 1."""
    import sys

    if not state.is_completed():
        print(f"turntree: study failed ({state.message}); rerun the same command to resume", file=sys.stderr)
        return 1
    result = state.result()
    print(Path(result["report"]).read_text())
    print(
        f"report: {result['report']}\nMLflow study run: {result['mlflow_run_id']} ({result['tracking_uri']})"
    )
    if result["failed"]:
        print(
            f"turntree: {len(result['failed'])} cell(s) did not complete ({', '.join(result['failed'])}); "
            "rerun the same command to resume them",
            file=sys.stderr,
        )
        return 1
    return 0
