"""Compare several checkpoints or runs (e.g. GRPO vs GTPO vs MURPHY from the same base) on the same problems.

    turntree compare base=smollm2 grpo=<run-id> gtpo=<run-id> murphy=<run-id> --benchmark synthetic:func-synth

Each entry is a run id (its final checkpoint is evaluated and its MLflow training curves are plotted) or a
checkpoint (a model directory, 'smollm2', 'tiny'). All are evaluated with the same EvalParams (same problems,
seeds, sampling). Writes report.md and PNGs to ``out``, logs them to an MLflow run tagged ``stage=compare``, and
publishes the markdown as a Prefect artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import evaluate_checkpoint
from flows.remote import is_remote, local_dir
from flows.runstore import RunStore
from flows.tasks import artifact_key, prepare_model
from flows.tracking import EVAL_EXPERIMENT, Tracker
from schemas.params import EvalParams


def paired_evaluations(run_root: str, a: str, b: str, resamples: int = 10_000) -> dict[str, Any]:
    """b − a of two stored held-out evaluations ``RUN:ITER`` (e.g. a run's starting policy ``r:0`` and its last
    iteration ``r:3``), or ``RUN`` for a ``turntree eval`` run, on the problems both scored: mean difference, paired
    bootstrap 95% CI, and the exact McNemar (sign) test on the problems that changed
    (``maths.paired.paired_comparison``). Comma-separated lists of equal length (``a-s0:8,a-s1:8``) pair up in
    order, one pair per seed, pooled as a study pools them (problems resampled with all their seeds, on the problems
    every evaluation scored), with the seeds' own Δs as ``across_seeds``."""
    import numpy as np

    from maths.eval_metrics import problem_scores, sample_records
    from maths.paired import across_seeds, paired_comparison
    from runtime.tableio import read_table
    from schemas.tables import EVAL_RESULTS

    def scores(ref: str) -> dict[str, float]:
        run, colon, it = ref.rpartition(":")
        if not colon:  # a `turntree eval` run: its one evaluation has no iteration
            run, it = ref, None
        elif not run or not it.isdigit():
            raise ValueError(f"--paired takes RUN:ITER (e.g. my-run:0 my-run:3) or an eval run's id, got {ref!r}")
        out = RunStore(run_root, run).current_output("evaluate", None if it is None else int(it))
        if out is None:
            at = "" if it is None else f" at iteration {it}"
            raise ValueError(f"run {run!r} has no evaluation{at} (RUN:ITER names a training run's iteration)")
        return problem_scores(sample_records(read_table(out.uri("eval_results"), EVAL_RESULTS)))

    left, right = a.split(","), b.split(",")
    if len(left) != len(right) or "" in left + right:
        raise ValueError(
            f"--paired lists pair up in order, none empty: {len(left)} evaluation(s) against {len(right)}"
        )
    sa, sb = [scores(r) for r in left], [scores(r) for r in right]
    common = sorted(set.intersection(*(set(x) for x in sa + sb)))
    if not common:
        raise ValueError(f"{a} and {b} share no problem")
    A = np.array([[x[p] for p in common] for x in sa])
    B = np.array([[y[p] for p in common] for y in sb])
    result = paired_comparison(A, B, resamples=resamples)
    out = {"a": a, "b": b, "a_mean": float(A.mean()), **result}
    if len(left) > 1:
        out["across_seeds"] = across_seeds((B - A).mean(axis=1))
    return out


def paired_text(r: dict[str, Any]) -> str:
    """``paired_evaluations``' result as ``turntree compare --paired`` prints it."""
    of = f"{r['problems']:.0f} problems" + (f" x {r['seeds']:.0f} seeds" if "across_seeds" in r else "")
    text = (
        f"{r['b']} - {r['a']}: {r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (paired bootstrap 95%), "
        f"{r['wins']:.0f} gained / {r['losses']:.0f} lost of {of}, exact McNemar p = {r['p_value']:.3g}; "
        f"{r['a']} scored {r['a_mean']:.3f}"
    )
    if x := r.get("across_seeds"):
        text += f"\nacross seeds (their own deltas, t 95%): {x['diff']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]"
    return text


def _target(run_root: str, target: str) -> tuple[str, str | None]:
    """(checkpoint spec, MLflow parent run id or None) for a run id or a checkpoint."""
    try:
        store = RunStore(run_root, target)
        exists = store.exists()
    except ValueError:  # not a valid run id: a path
        exists = False
    if not exists:
        return target, None
    manifest = store.load()
    ckpt = manifest.get("final_checkpoint")
    if not ckpt:
        raise ValueError(f"run {target!r} has no final checkpoint (status {manifest.get('status')!r})")
    if is_remote(ckpt):  # a run on S3: this machine's copy of its checkpoint, checked against the manifest
        found = store.recorded_ref(ckpt)
        ckpt = str(local_dir(ckpt, found[2].sha256 if found else None))
    return ckpt, manifest.get("mlflow_run_id")


@flow(name="turntree-compare", log_prints=True)
def compare_flow(
    entries: dict[str, str], params: EvalParams, run_root: str = "runs", out: str = "reports/compare"
) -> dict[str, Any]:
    from prefect.runtime import flow_run

    from stages.compare import compare, metric_histories

    if not entries:
        raise ValueError("compare needs at least one NAME=CHECKPOINT_OR_RUN_ID")
    fr = str(flow_run.id or "none")
    evals, train_runs = {}, {}
    for name, target in entries.items():
        ckpt, mlflow_run = _target(run_root, target)
        evals[name] = evaluate_checkpoint(prepare_model(ckpt), params, run_root, fr)["eval_results"]
        if mlflow_run:
            train_runs[name] = mlflow_run
    tracker = Tracker(run_root, EVAL_EXPERIMENT)
    curves = metric_histories(train_runs, tracking_uri=tracker.store_uri) if train_runs else None
    result = compare(evals, Path(out), curves, bootstrap=params.bootstrap, seed=params.seed)
    run = tracker.start_parent(
        "compare",
        {"entries": entries, "eval": params.model_dump(mode="json")},
        {"stage": "compare", "algo": ",".join(entries), "prefect.flow_run_id": fr},
    )
    tracker.log_metrics(run, result.metrics, 0)
    for ref in result.tables.values():
        tracker.log_artifact(run, ref.uri, "report")
    tracker.end(run)
    report = Path(result.uri("report"))
    create_markdown_artifact(
        key=artifact_key("compare", fr[:8]),
        markdown=report.read_text(),
        description="turntree comparison (PNGs beside report.md and in MLflow)",
    )
    get_run_logger().info("report: %s", report)
    return {
        "report": str(report),
        "files": {k: v.uri for k, v in result.tables.items()},
        "mlflow_run_id": run,
        "metrics": result.metrics,
    }
