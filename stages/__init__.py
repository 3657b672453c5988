"""The pipeline's steps, one module or small package each, and the table that lists them.

Every stage is ``<module>.run(params, inputs: dict[str, str], out: Path) -> StageOutput``: it reads the stored
tables named in ``inputs``, writes its outputs under ``out`` and returns references to them
(``schemas.outputs``). The table below is the one place that says, for each stage, where it lives, which
``PipelineParams`` field holds its parameters, where it sits in a run, whether a failure is worth retrying, and
what it reads and writes. ``flows.runner.run_stage`` checks inputs against it; ``flows.pipeline.drive`` chains
the stages. Adding a stage is one row here plus its module.

Inputs: ``a|b`` means one of them (which depends on the rollout kind), a trailing ``?`` an optional input.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    params: str  # field of schemas.params.PipelineParams holding this stage's parameters
    iteration: int | None | str  # "each": once per RL iteration 1..N; an int or None: fixed place in the run
    retries: int  # retried only on transient I/O errors (never on bad configuration)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    description: str
    pipeline: bool = True  # a step of the training pipeline (False: run by its own command)

    @property
    def params_model(self) -> type:
        """The pydantic model of this stage's parameters: the type of its ``PipelineParams`` field."""
        from schemas.params import PipelineParams

        return PipelineParams.model_fields[self.params].annotation

    @property
    def per_iteration(self) -> bool:
        return self.iteration == "each"

    def missing_inputs(self, given: dict[str, str]) -> list[str]:
        """The required inputs absent from ``given`` (``a|b``: one of them must be there)."""
        missing = []
        for spec in self.inputs:
            if spec.endswith("?"):
                continue
            if not any(name in given for name in spec.split("|")):
                missing.append(spec)
        return missing


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("data", "stages.data", "data", None, 2, (), ("problems",),
                  "load, check, dedupe and split problems into problems.parquet"),
        StageSpec("warmstart", "stages.warmstart", "warmstart", 0, 0, ("problems", "checkpoint"),
                  ("checkpoint",), "supervised fine-tuning on tool-using demonstrations"),
        StageSpec("rollout", "stages.rollout", "rollout", "each", 0, ("problems", "checkpoint", "iteration"),
                  ("trajectories|trees",), "sample trajectories or feedback trees with sandboxed execution"),
        StageSpec("score", "stages.score", "score", "each", 0, ("trajectories|trees", "problems"),
                  ("trajectories|trees",), "run the tests, fill outcome, format and turn rewards"),
        StageSpec("advantages", "stages.advantages", "advantages", "each", 0, ("trajectories|trees",),
                  ("samples", "trees?"), "credit assignment: per-token advantages as training samples"),
        StageSpec("update", "stages.update", "update", "each", 0, ("samples", "checkpoint", "ref_checkpoint?"),
                  ("checkpoint",), "PPO-clip policy update, new checkpoint, weight sync into the engine"),
        StageSpec("evaluate", "stages.evaluate", "eval", "each", 0, ("checkpoint", "problems?"),
                  ("eval_results",), "pass@1 at Iter-1..K / math accuracy with confidence intervals"),
        StageSpec("compare", "stages.compare", "eval", None, 0, ("eval_results",), ("report",),
                  "comparison report of several evaluations (run by `turntree compare`)", pipeline=False),
        StageSpec("study", "stages.study", "eval", None, 0, ("eval_results",), ("report",),
                  "a study's report: cells, compute, learning curves, paired tests (run by `turntree study`)",
                  pipeline=False),
    )
}  # fmt: skip
PIPELINE_STAGES = tuple(name for name, spec in STAGES.items() if spec.pipeline)  # in the order they run


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(PIPELINE_STAGES)}")
    return STAGES[name]
