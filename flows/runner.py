"""Running one stage invocation: import the stage's module, run it into a scratch dir, commit it to the run
store, track it in MLflow. Plain Python (no Prefect), so the benchmark can call the same path without
orchestration.

Stages are listed in the stage table (``stages.STAGES``): module, parameters field, place in the run, retries,
inputs and outputs. ``run_stage`` refuses a call whose required inputs are missing before any work starts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from flows.cards import model_card
from flows.integrity import IntegrityError, code_hash, dir_fingerprint
from flows.provenance import git_sha, source_tags
from flows.remote import check_stored, is_remote, local_view, localize
from flows.runstore import RunStore, stage_key
from runtime import watchdog
from runtime.engines.live import relabel
from schemas.outputs import StageOutput
from schemas.params import PipelineParams
from stages import PIPELINE_STAGES, stage_spec

log = logging.getLogger("turntree.runner")


@dataclass
class RunContext:
    """What every stage invocation of one run needs to know, besides its own params and inputs."""

    root: str
    run_id: str
    algo: str
    mlflow_parent: str | None = None
    flow_run_id: str = "none"
    git_sha: str = field(default_factory=git_sha)


def params_field(stage: str) -> str:
    return stage_spec(stage).params


def params_model(stage: str) -> type[BaseModel]:
    if stage not in PIPELINE_STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(PIPELINE_STAGES)}")
    return stage_spec(stage).params_model


def rerun_params(stage: str, recorded: dict, overrides: dict | None) -> dict:
    """A stage rerun's parameters: the recorded ones deep-merged with ``overrides`` (one entry of a nested
    dict, e.g. ``reward_weights.correct``, leaves the others as recorded), which may be spelled as for ``run``
    (``score.shaping_alpha``) or without the section (``shaping_alpha``)."""
    from flows.config import deep_merge

    overrides = dict(overrides or {})
    section = params_field(stage)
    if isinstance(overrides.get(section), dict) and section not in params_model(stage).model_fields:
        overrides = deep_merge(overrides.pop(section), overrides)
    return deep_merge(recorded, overrides)


def stage_params(stage: str, recorded: dict, overrides: dict | None) -> BaseModel:
    """A stage rerun's validated parameters (``rerun_params``), for ``turntree stage``'s preflight and for the
    stage flow (which the Prefect UI starts without one); a bad key or value is ``run``'s one-line error."""
    from pydantic import ValidationError

    from flows.config import UserError, validation_message

    try:
        return params_model(stage).model_validate(rerun_params(stage, recorded, overrides))
    except ValidationError as e:
        raise UserError(validation_message(e, section=params_field(stage))) from None


def default_run_id(params: PipelineParams) -> str:
    """Same parameters -> same run id, so rerunning a pipeline resumes it instead of starting over."""
    body = params.model_dump(exclude={"run_id", "run_root", "dispatch"})
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params.algorithm}-{digest}"


def fingerprint(inputs: dict[str, str]) -> dict[str, str]:
    """Content fingerprints of a stage's inputs, for cache keys and reuse: a stored table's uri is versioned (and
    its sha256 checked against the manifest before it is read); a directory (a model) is fingerprinted by the
    sha256 of its files, so new weights written into the same directory are never mistaken for the old ones."""
    out = {}
    for name, uri in inputs.items():
        p = Path(uri)
        out[name] = dir_fingerprint(p)[:16] if "://" not in uri and p.is_dir() else uri
    return out


def stage_code(stage: str) -> str:
    """Hash of the stage's module and every project module it imports (an edit anywhere there: recompute)."""
    return code_hash(stage_spec(stage).module)


def check_inputs(store: RunStore, inputs: dict[str, str]) -> None:
    """Refuse to read a stored input that differs from what its stage committed (one line: the file, why, and
    the command that rewrites it)."""
    if not store.exists():
        return
    for uri in inputs.values():
        found = store.recorded_ref(uri) if isinstance(uri, str) else None
        if found is None:
            continue
        key, version, ref = found
        why = check_stored(ref.uri, ref.sha256, ref.size)  # a remote checkpoint: through the local mirror
        if why:
            raise IntegrityError(
                f"{ref.uri} ({key} {version}) is corrupt: {why}; rewrite it with `{store.repair_command(key)}`"
            )


def run_stage(
    stage: str,
    params: BaseModel,
    inputs: dict[str, str],
    ctx: RunContext,
    iteration: int | None,
    tags: dict[str, str] | None = None,
) -> StageOutput:
    """Run the stage's ``run`` and commit its output as the stage's next version. Its MLflow child run is named
    and tagged with that version (``turntree.version``; ``turntree.current`` true, and false on the child of
    the version it supersedes); ``tags`` (a rerun's overrides) go on the child too."""
    spec = stage_spec(stage)
    missing = spec.missing_inputs(inputs)
    if missing:
        raise KeyError(f"stage {stage!r} needs inputs {missing}; got {sorted(inputs)}")
    store = RunStore(ctx.root, ctx.run_id)
    check_inputs(store, inputs)
    module = importlib.import_module(spec.module)
    code = stage_code(stage)
    prints = fingerprint(inputs)
    scratch = store.scratch_dir(stage, iteration)
    step = iteration or 0
    tracker, child = _start_child(ctx, stage, iteration, params, tags or {})
    previous = _current_child(store, stage, iteration)
    t0 = time.perf_counter()
    label = stage if iteration is None else f"{stage} (iteration {iteration})"
    watchdog.beat(label)
    try:
        output: StageOutput = module.run(params, _local_inputs(store, inputs), scratch)
    except BaseException as e:
        if tracker and child:
            tracker.log_text(child, traceback.format_exc(), "error.txt")
            tracker.end(child, "FAILED")
        _cleanup(scratch)
        log.error("stage %s failed: %s", stage, e)
        raise
    elapsed = time.perf_counter() - t0
    output.metrics.setdefault(f"timing/{stage}", elapsed)
    output = store.commit(
        stage,
        iteration,
        scratch,
        output,
        inputs=inputs,
        params=params.model_dump(mode="json"),
        params_field=params_field(stage),
        code=code,
        fingerprints=prints,
        made_by={
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "flow_run_id": ctx.flow_run_id,
            **({"mlflow_run_id": child} if child else {}),
        },
        moved=relabel,  # the live engine's weights that named the scratch checkpoint now name the committed one
    )
    if tracker and child:
        try:
            version = store.load()["stages"][stage_key(stage, iteration)]["current"]
            tracker.rename(child, f"{_child_name(stage, iteration)} {version}")
            tracker.set_tags(child, {"turntree.version": version, "turntree.current": "true"})
            if previous and previous != child:
                tracker.set_tags(previous, {"turntree.current": "false"})
            _log_outputs(tracker, child, ctx, stage, output, step)
            if stage == "advantages":
                _log_completions(tracker, child, ctx, store, inputs, output, step)
            tracker.end(child, "FINISHED")
        except Exception as e:  # tracking trouble must not lose a finished stage's output
            log.warning("MLflow logging of stage %s failed: %s", stage, e)
    log.info(
        "stage %s (iter %s) done in %.1fs: %s",
        stage,
        iteration,
        elapsed,
        {k: v.uri for k, v in output.tables.items()},
    )
    return output


def _local_inputs(store: RunStore, inputs: dict[str, str]) -> dict[str, str]:
    """What the stage is given: ``inputs``, with a model directory on a remote root replaced by this machine's
    copy (``flows.remote``: checked against the sha256 the manifest recorded); the manifest keeps the URIs."""
    if not store.remote:
        return dict(inputs)

    def recorded_sha(uri: str) -> str | None:
        found = store.recorded_ref(uri)
        return found[2].sha256 if found else None

    return localize(inputs, recorded_sha)


def _cleanup(scratch: Path) -> None:
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)


def _child_name(stage: str, iteration: int | None) -> str:
    return stage if iteration is None else f"iter-{iteration}/{stage}"


def _current_child(store: RunStore, stage: str, iteration: int | None) -> str | None:
    """The MLflow child run of the stage's current version (before a new one is committed), if recorded."""
    entry = store.load()["stages"].get(stage_key(stage, iteration)) or {}
    record = entry.get("versions", {}).get(entry.get("current") or "", {})
    return record.get("made_by", {}).get("mlflow_run_id")


def _start_child(
    ctx: RunContext, stage: str, iteration: int | None, params: BaseModel, extra: dict[str, str]
):
    if not ctx.mlflow_parent:
        return None, None
    from flows.tracking import Tracker

    tracker = Tracker(ctx.root)
    name = _child_name(stage, iteration)
    tags = {
        **extra,
        "turntree.stage_key": stage_key(stage, iteration),
        "stage": stage,
        "algo": ctx.algo,
        "git_sha": ctx.git_sha,
        **source_tags(ctx.git_sha),
        "prefect.flow_run_id": ctx.flow_run_id,
        "turntree.run_id": ctx.run_id,
    }
    child = tracker.start_child(ctx.mlflow_parent, name, {stage: params.model_dump(mode="json")}, tags)
    return tracker, child


def _log_outputs(tracker, child: str, ctx: RunContext, stage: str, output: StageOutput, step: int) -> None:
    tracker.log_metrics(child, output.metrics, step)
    tracker.log_metrics(ctx.mlflow_parent, output.metrics, step)
    tracker.log_dict(child, output.model_dump(mode="json"), "stage_output.json")
    for name, ref in output.tables.items():
        if ref.uri.endswith(".parquet") and (is_remote(ref.uri) or os.path.exists(ref.uri)):
            tracker.log_sample_table(child, ref.uri, name)
            if name in ("trajectories", "trees") and stage != "rollout":  # unscored: no rewards yet
                tracker.log_transcripts(child, ref.uri, name)
            if name == "problems":
                for split, context in (("train", "training"), ("eval", "evaluation")):
                    for run in (child, ctx.mlflow_parent):
                        tracker.log_dataset(run, ref.uri, f"{name}-{split}", context, split=split)
        local = local_view(ref.uri)  # a remote checkpoint: this machine's mirror of what it uploaded
        if name == "checkpoint" and local and os.path.isdir(local):
            tracker.log_model_card(child, local, model_card(ctx, stage, step, ref.uri), ref.uri)
            steps = Path(local).parent / "steps.jsonl"
            if steps.is_file():  # the update's per-optimizer-step records, on the global step
                records = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
                for run in (child, ctx.mlflow_parent):
                    tracker.log_steps(run, records)


def _log_completions(tracker, child, ctx, store, inputs, output, step) -> None:
    """The iteration's completions viewer (``flows.completions``) on the advantages child and the parent."""
    from flows.completions import completion_rows, completions_html

    rollout = output.tables["trees"].uri if "trees" in output.tables else inputs.get("trajectories")
    data = store.current_output("data", stage_spec("data").iteration)
    if not rollout or is_remote(rollout):  # a remote root: the stored tables are the viewer
        return
    samples = output.tables.get("samples")
    rows = completion_rows(rollout, samples.uri if samples else None, data.uri("problems") if data else None)
    if not rows:
        return
    page = completions_html(rows, f"run {ctx.run_id}, iteration {step}: {len(rows)} turns / nodes")
    for run in (child, ctx.mlflow_parent):
        tracker.log_rows(run, rows, f"completions/iter-{step}.json")
        tracker.log_text(run, page, f"completions/iter-{step}.html")
