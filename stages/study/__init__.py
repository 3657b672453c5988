"""The study report: a grid of pipeline runs (methods × seeds × grid points, ``turntree study``) read back from
their stored outputs into one Markdown report, learning curves and paired comparisons.

    report(results: [CellResult], out, name=..., bootstrap=...) -> StageOutput
        out/report.md            the cells' table, compute (planned and measured), shared inputs, the paired
                                 comparisons, and the command that regenerates it all
        out/learning_curves.png  training reward and held-out accuracy per iteration, a line per method with its
                                 95% band across seeds
        out/results.json         the same numbers, machine-readable

``plan`` builds and checks a study's cells before anything runs; ``report`` (``stages.study.report``) and
``plots`` work on what the runs stored: their manifests' metrics (gathered by ``flows.study``) and their
``eval_results`` tables (per-problem correctness, the unit of the paired statistics, ``maths.paired``). This
package never imports prefect or mlflow; the flow (``flows/study.py``) runs the cells and logs the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from schemas.outputs import StageOutput


@dataclass
class CellResult:
    """What one cell's run stored, as the flow read it back from the run store."""

    run_id: str
    method: str
    algorithm: str
    seed: int
    point: str  # grid point label ("" without a grid)
    status: str  # the run manifest's status ("completed", "failed", …; "not started" without a manifest)
    planned: int  # completions planned per iteration (stages.study.plan.planned_completions)
    iterations: int  # planned RL iterations
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # iteration -> its stages' metrics
    evals: dict[int, str] = field(
        default_factory=dict
    )  # iteration -> eval_results table (0: starting policy)
    completions: dict[int, int] = field(
        default_factory=dict
    )  # iteration -> trajectories / tree nodes sampled
    problems_sha256: str | None = None  # the data stage's problems table
    warmstart_sha256: str | None = None  # the warm start's checkpoint (None: no warm start)
    mlflow_run_id: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@lru_cache(maxsize=1024)
def _records(uri: str) -> tuple[dict, ...]:
    from maths.eval_metrics import sample_records
    from runtime.tableio import read_table
    from schemas.tables import EVAL_RESULTS

    return tuple(sample_records(read_table(uri, EVAL_RESULTS)))


@lru_cache(maxsize=4096)
def scores(uri: str, attempt: int = 1) -> dict[str, float]:
    """{problem_id: held-out score} of one stored evaluation (``maths.eval_metrics.problem_scores``: pass@1 at
    Iter-``attempt`` of the self-correction loop — solved within the first ``attempt`` attempts — or answer
    accuracy); a new version of a stage is a new uri, so the cache never goes stale."""
    from maths.eval_metrics import problem_scores

    return problem_scores(list(_records(uri)), attempt)


def attempts(uri: str) -> int:
    """The most self-correction attempts any problem of one stored evaluation was given (1: no feedback loop)."""
    return max((r["attempts"] for r in _records(uri)), default=1)


def report(
    results: list[CellResult], out: Path, *, name: str, bootstrap: int = 10_000, command: str = ""
) -> StageOutput:
    """Write report.md, learning_curves.png and results.json for ``results`` into ``out``."""
    from stages.study.report import write

    return write(results, Path(out), name=name, bootstrap=bootstrap, command=command)
