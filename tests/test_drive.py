"""``flows.pipeline.drive``, the stage sequence, with recording stand-ins for the stage calls (the real calls
are the pipeline tests'): what runs beside what when the pipeline is asynchronous, and what each stage reads."""

from __future__ import annotations

import pytest

from flows.pipeline import drive
from flows.runner import RunContext
from schemas.outputs import StageOutput, TableRef
from schemas.params import PipelineParams

OUTPUTS = {
    "data": ("problems",),
    "rollout": ("trajectories",),
    "score": ("trajectories",),
    "advantages": ("samples",),
    "update": ("checkpoint",),
    "evaluate": ("eval_results",),
}


class Recorder:
    """call/submit stand-ins: every stage returns a made-up output; ``log`` says when each was called,
    submitted, and when a submitted one's output was asked for."""

    def __init__(self):
        self.log: list[str] = []

    def out(self, stage: str, it) -> StageOutput:
        tables = {t: TableRef(uri=f"{stage}-{it}/{t}", sha256="x", rows=1) for t in OUTPUTS[stage]}
        return StageOutput(stage=stage, tables=tables, metrics={f"{stage}/it": float(it or 0)})

    def call(self, stage, params, inputs, ctx, it, upstream=()):
        self.log.append(f"call {stage} {it} ckpt={inputs.get('checkpoint', '-')}")
        return self.out(stage, it)

    def submit(self, stage, params, inputs, ctx, it, upstream=()):
        self.log.append(f"submit {stage} {it} ckpt={inputs.get('checkpoint', '-')}")

        def result():
            self.log.append(f"await {stage} {it}")
            return self.out(stage, it)

        return result


def _run(staleness: int, evaluate_every: int = 1):
    rec, seen = Recorder(), []
    params = PipelineParams.model_validate(
        {
            "iterations": 3,
            "max_staleness": staleness,
            "evaluate_every": evaluate_every,
            "warmstart": {"enabled": False},
        }
    )
    ctx = RunContext(root="/nowhere", run_id="r", algo="gtpo", git_sha="x")
    _, summary = drive(params, ctx, rec.call, "base", lambda k, m: seen.append(k), rec.submit)
    return rec.log, seen, summary


def test_synchronous_pipeline_evaluates_each_checkpoint_before_going_on():
    log, seen, summary = _run(0)
    assert [x for x in log if x.split()[1] in ("evaluate", "update")] == [
        "call evaluate 0 ckpt=base",
        "call update 1 ckpt=base",
        "call evaluate 1 ckpt=update-1/checkpoint",
        "call update 2 ckpt=update-1/checkpoint",
        "call evaluate 2 ckpt=update-2/checkpoint",
        "call update 3 ckpt=update-2/checkpoint",
        "call evaluate 3 ckpt=update-3/checkpoint",
    ]
    assert seen == [0, 1, 2, 3] and [s["iteration"] for s in summary] == [0, 1, 2, 3]


@pytest.mark.parametrize("every", [1, 2])
def test_asynchronous_pipeline_evaluates_beside_the_next_update(every):
    """max_staleness 1: evaluation k (of checkpoint k) is submitted, update k+1 trains, then k's result is
    awaited; the last evaluation is awaited before drive returns; iterations are reported in order, each with
    its own evaluation."""
    log, seen, summary = _run(1, every)
    events = [x for x in log if x.split()[1] in ("evaluate", "update")]
    if every == 1:
        assert events == [
            "call evaluate 0 ckpt=base",
            "call update 1 ckpt=base",
            "submit evaluate 1 ckpt=update-1/checkpoint",
            "call update 2 ckpt=update-1/checkpoint",
            "await evaluate 1",
            "submit evaluate 2 ckpt=update-2/checkpoint",
            "call update 3 ckpt=update-2/checkpoint",
            "await evaluate 2",
            "call evaluate 3 ckpt=update-3/checkpoint",
        ]
    else:
        assert events[-4:] == [
            "submit evaluate 2 ckpt=update-2/checkpoint",
            "call update 3 ckpt=update-2/checkpoint",
            "await evaluate 2",
            "call evaluate 3 ckpt=update-3/checkpoint",
        ]
    assert seen == [0, 1, 2, 3] and [s["iteration"] for s in summary] == [0, 1, 2, 3]
    for s in summary[1:]:
        has_eval = s["iteration"] % every == 0 or s["iteration"] == 3
        assert ("evaluate/it" in s) == has_eval and s.get("evaluate/it", s["iteration"]) == s["iteration"]
        assert s["update/it"] == s["iteration"]
