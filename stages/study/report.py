"""The study's numbers and its Markdown: the cells' table, compute planned and measured, the inputs the cells
shared, and the paired comparisons (each method against its warm start, each pair of methods), pooled over
seeds, per seed, and across seeds (the seeds' Δs as the sample) (``maths.paired``).

Held-out accuracy is per problem from each run's stored ``eval_results`` table (``maths.eval_metrics``:
pass@1 at the first attempt for code, answer accuracy for math; one greedy sample per problem makes it 0 or
1); a run's "warm start" is its iteration-0 evaluation (the policy RL starts from, warm-started or not), its
"final" its last evaluation.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from maths.eval_metrics import bench_key
from maths.paired import across_seeds, paired_comparison
from runtime.tableio import sha256_file
from schemas.outputs import StageOutput, TableRef
from stages.study import CellResult, attempts, scores


def final_iteration(c: CellResult) -> int | None:
    return max(c.evals) if c.evals else None


def held_out(c: CellResult, k: int | None, attempt: int = 1) -> tuple[float, float, int] | None:
    """(accuracy, problems solved, problems) of the cell's evaluation after iteration ``k`` (code: pass@1 at
    self-correction Iter-``attempt``)."""
    if k is None or k not in c.evals:
        return None
    s = list(scores(c.evals[k], attempt).values())
    return (float(np.mean(s)), float(np.sum(s)), len(s)) if s else None


def groups(results: list[CellResult]) -> dict[str, dict[str, dict[int, CellResult]]]:
    """{grid point: {method: {seed: completed cell}}}, in the study's order."""
    out: dict[str, dict[str, dict[int, CellResult]]] = {}
    for c in results:
        if c.completed:
            out.setdefault(c.point, {}).setdefault(c.method, {})[c.seed] = c
    return out


def total(c: CellResult, metric: str) -> float:
    return float(sum(m.get(metric, 0.0) for k, m in c.metrics.items() if k >= 1))


# --- paired comparisons -----------------------------------------------------------------------------------
def _aligned(
    pairs: list[tuple[int, dict[str, float], dict[str, float]]],
) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B) of shape (seeds, problems) on the problems every pair scored, and how many problems were left out."""
    common = sorted(set.intersection(*(set(a) & set(b) for _, a, b in pairs)))
    every = set().union(*(set(a) | set(b) for _, a, b in pairs))
    a = np.array([[x[p] for p in common] for _, x, _ in pairs], dtype=np.float64)
    b = np.array([[y[p] for p in common] for _, _, y in pairs], dtype=np.float64)
    return a, b, len(every) - len(common)


def _compare(point: str, a: str, b: str, pairs: list, bootstrap: int) -> list[dict[str, Any]]:
    if not pairs:
        return []
    seeds = [s for s, _, _ in pairs]
    A, B, left_out = _aligned(pairs)
    if A.size == 0:
        return [
            {"point": point, "a": a, "b": b, "scope": "pooled", "seeds": seeds, "error": "no common problem"}
        ]

    def row(scope: str, on: list[int], stats: dict[str, float]) -> dict[str, Any]:
        return {**stats, "point": point, "a": a, "b": b, "scope": scope, "seeds": on, "left_out": left_out}

    rows = [row("pooled", seeds, paired_comparison(A, B, resamples=bootstrap, seed=0))]
    if len(pairs) > 1:
        for i, s in enumerate(seeds):
            rows.append(
                row(f"seed {s}", [s], paired_comparison(A[i : i + 1], B[i : i + 1], resamples=bootstrap))
            )
        rows.append(row("across seeds", seeds, across_seeds((B - A).mean(axis=1))))
    return rows


def comparisons(results: list[CellResult], bootstrap: int, attempt: int = 1) -> list[dict[str, Any]]:
    """Per grid point: each method's final evaluation against its warm start (iteration 0) in the same runs,
    then each pair of methods' final evaluations, seed by seed; each pooled over seeds and per seed. Scores are
    pass@1 at self-correction Iter-``attempt`` (1: the first attempt; math: accuracy)."""
    rows: list[dict[str, Any]] = []
    for point, methods in groups(results).items():
        for m, by_seed in methods.items():
            pairs = [
                (s, scores(c.evals[0], attempt), scores(c.evals[k], attempt))
                for s, c in sorted(by_seed.items())
                if 0 in c.evals and (k := final_iteration(c))
            ]
            rows += _compare(point, "warm start", m, pairs, bootstrap)
        for m1, m2 in itertools.combinations(methods, 2):
            seeds = sorted(set(methods[m1]) & set(methods[m2]))
            pairs = []
            for s in seeds:
                c1, c2 = methods[m1][s], methods[m2][s]
                k1, k2 = final_iteration(c1), final_iteration(c2)
                if k1 is not None and k2 is not None:
                    pairs.append((s, scores(c1.evals[k1], attempt), scores(c2.evals[k2], attempt)))
            rows += _compare(point, m1, m2, pairs, bootstrap)
    return rows


def comparison_lines(rows: list[dict[str, Any]]) -> list[str]:
    head = "| comparison | seeds | pairs | Δ held-out [95% CI] | better / worse | p (exact sign test) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['b']} − {r['a']}" + (f" ({r['point']})" if r["point"] else "")
        if r["scope"] != "pooled":
            label = ""
        scope = r["scope"] if r["scope"] != "pooled" else "pooled " + ", ".join(str(s) for s in r["seeds"])
        if "error" in r:
            lines.append(f"| {label} | {scope} | 0 | {r['error']} | | |")
            continue
        ci = f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        if r["scope"] == "across seeds":  # the seeds are the sample (t interval), see across_seeds
            lines.append(
                f"| | across seeds (t) | {r['pairs']:.0f} seeds | {ci} | {r['wins']:.0f} / {r['losses']:.0f}"
                " seeds | – |"
            )
            continue
        lines.append(
            f"| {label} | {scope} | {r['pairs']:.0f} | {ci} | {r['wins']:.0f} / {r['losses']:.0f} | "
            f"{r['p_value']:.3g} |"
        )
    return lines


# --- self-correction: pass@1 at Iter-1..Iter-K (the MURPHY paper's table) when the evaluation retried ------------
def depth(results: list[CellResult]) -> int:
    """K: the most attempts any completed cell's evaluation gave a problem (1: no retry from feedback)."""
    return max((attempts(u) for c in results if c.completed for u in c.evals.values()), default=1)


def self_correction(
    results: list[CellResult], rows: list[dict[str, Any]], bootstrap: int
) -> tuple[list[str], dict[str, Any]]:
    """The report's self-correction section and its results.json entry (nothing when no evaluation retried):
    per completed cell pass@1 at Iter-1..K of its warm start and final evaluation, then the pooled comparisons
    of ``comparisons`` at each k (``rows``: those at k = 1). Iter-k counts a problem solved if one of its first k
    attempts passed, so each k pairs like the first attempt does."""
    k_max = depth(results)
    if k_max < 2:
        return [], {}
    ks = range(1, k_max + 1)
    acc = lambda c, i, k: h[0] if (h := held_out(c, i, k)) else None  # noqa: E731
    cells = [
        {"run_id": c.run_id, "method": c.method, "seed": c.seed, "point": c.point,
         "final_iteration": final_iteration(c), "warmstart": [acc(c, 0, k) for k in ks],
         "final": [acc(c, final_iteration(c), k) for k in ks]}
        for c in results if c.completed
    ]  # fmt: skip
    by_k = {1: rows, **{k: comparisons(results, bootstrap, attempt=k) for k in ks if k > 1}}
    pooled = [
        {**r, "iteration": k} for k in ks for r in by_k[k] if r["scope"] == "pooled" and "error" not in r
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = ["cell", "method", "seed", *(f"warm start Iter-{k}" for k in ks), *(f"final Iter-{k}" for k in ks)]
    md = [
        f"## Self-correction: pass@1 at Iter-1..Iter-{k_max}",
        "",
        "Iter-k: a problem counts as solved if one of its first k attempts passes, each retry prompted with the",
        "failed attempt's test feedback (the MURPHY paper's table). Warm start = the cell's iteration 0.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *(f"| `{r['run_id']}` | {r['method']} | {r['seed']} | " + " | ".join(fmt(v) for v in r["warmstart"] + r["final"])
          + " |" for r in cells),
        "",
        "| comparison | Iter-k | seeds | pairs | Δ pass@1 [95% CI] | better / worse | p (exact sign test) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in pooled:
        label = f"{r['b']} − {r['a']}" + (f" ({r['point']})" if r["point"] else "")
        md.append(
            f"| {label} | {r['iteration']} | {', '.join(map(str, r['seeds']))} | {r['pairs']:.0f} | "
            f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['wins']:.0f} / {r['losses']:.0f} | "
            f"{r['p_value']:.3g} |"
        )
    return md + [""], {"iterations": k_max, "cells": cells, "comparisons": pooled}


# --- the cells and their compute ------------------------------------------------------------------------------
def _acc(h: tuple[float, float, int] | None) -> str:
    return "-" if h is None else f"{h[0]:.3f} ({h[1]:g}/{h[2]})"


def cell_row(c: CellResult) -> dict[str, Any]:
    """The cell's numbers, as in the table and results.json."""
    start, final = held_out(c, 0), held_out(c, final_iteration(c))
    return {
        "run_id": c.run_id,
        "method": c.method,
        "algorithm": c.algorithm,
        "seed": c.seed,
        "point": c.point,
        "status": c.status,
        "warmstart_heldout": start[0] if start else None,
        "final_heldout": final[0] if final and final_iteration(c) else None,
        "final_iteration": final_iteration(c),
        "reward": [c.metrics[k].get("reward/mean") for k in sorted(c.metrics) if k >= 1],
        "planned_completions_per_iteration": c.planned,
        "iterations": c.iterations,
        "sampled_completions": sum(c.completions.values()),
        "generated_tokens": total(c, "rollout/tokens"),
        "trained_tokens": total(c, "actor/trained_tokens"),
        "mlflow_run_id": c.mlflow_run_id,
    }


def heldout_lines(results: list[CellResult]) -> list[str]:
    """One JSON line per evaluation of every cell: its per-problem held-out scores (and, when the evaluation
    retried from feedback, ``scores_by_attempt``: {k: pass@1 at Iter-k} for k ≥ 2). With them any two
    evaluations can be paired again (``maths.paired.paired_comparison``) when the run store is gone."""
    out = []
    for c in results:
        for k in sorted(c.evals):
            line = {"run_id": c.run_id, "method": c.method, "seed": c.seed, "point": c.point, "iteration": k,
                    "scores": scores(c.evals[k])}  # fmt: skip
            if (deep := attempts(c.evals[k])) > 1:
                line["scores_by_attempt"] = {str(a): scores(c.evals[k], a) for a in range(2, deep + 1)}
            out.append(json.dumps(line, sort_keys=True))
    return out


def cell_lines(results: list[CellResult]) -> list[str]:
    head = [
        "cell", "method", "seed", *(["grid point"] if any(c.point for c in results) else []), "status",
        "held-out warm start", "held-out final", "reward per iteration", "completions planned / iter",
        "completions sampled", "generated tokens", "trained tokens",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in results:
        r = cell_row(c)
        final = held_out(c, final_iteration(c)) if final_iteration(c) else None
        reward = " → ".join("-" if v is None else f"{v:.2f}" for v in r["reward"]) or "-"
        cells = [
            f"`{c.run_id}`", c.method, str(c.seed), *([c.point] if "grid point" in head else []), c.status,
            _acc(held_out(c, 0)), _acc(final), reward, str(c.planned), str(r["sampled_completions"]),
            f"{r['generated_tokens']:.0f}", f"{r['trained_tokens']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _spread(values: dict[str, float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values, key=values.get), max(values, key=values.get)
    if values[lo] == values[hi]:
        return f"{values[lo]:.0f} in every cell"
    rel = f"+{values[hi] / values[lo] - 1:.1%}" if values[lo] else "from 0"
    return f"{values[lo]:.0f} (`{lo}`) to {values[hi]:.0f} (`{hi}`), {rel}"


def compute_lines(results: list[CellResult]) -> list[str]:
    """Planned and measured compute across the cells, and whether the cells of each grid point shared their
    inputs (the problems table and warm-start checkpoint by sha256, the starting policy's evaluation)."""
    done = [c for c in results if c.completed]
    lines = [
        f"- planned completions per iteration: {_spread({c.run_id: c.planned for c in results})} "
        "(MURPHY: every tree grown to its full size)",
        f"- sampled completions, all iterations: {_spread({c.run_id: sum(c.completions.values()) for c in done})}",
        f"- generated tokens: {_spread({c.run_id: total(c, 'rollout/tokens') for c in done})}",
        f"- trained tokens (measured; groups without signal train nothing): "
        f"{_spread({c.run_id: total(c, 'actor/trained_tokens') for c in done})}",
    ]
    for point in dict.fromkeys(c.point for c in done):
        cs = [c for c in done if c.point == point]
        where = f" ({point})" if point else ""
        for what, attr in (
            ("problems table", "problems_sha256"),
            ("warm-start checkpoint", "warmstart_sha256"),
        ):
            shas = {getattr(c, attr) for c in cs}
            if shas == {None}:
                continue
            same = len(shas) == 1
            lines.append(
                f"- {what}{where}: "
                + (f"the same in all {len(cs)} cells (sha256 {next(iter(shas))[:12]})" if same
                   else f"**differs** between cells: {len(shas)} versions")
            )  # fmt: skip
        hits = sum(c.metrics.get(0, {}).get("warmstart/cache_hit", 0.0) == 1.0 for c in cs)
        if any(c.warmstart_sha256 for c in cs):
            lines.append(f"- warm start{where}: trained {len(cs) - hits}×, reused from the cache {hits}×")
        starts = {json.dumps(scores(c.evals[0]), sort_keys=True) for c in cs if 0 in c.evals}
        if starts:
            lines.append(
                f"- starting policy's held-out evaluation{where}: "
                + ("identical in every cell" if len(starts) == 1 else f"**{len(starts)} different results**")
            )
    return lines


# --- the report ------------------------------------------------------------------------------------------------
def summary_metrics(
    results: list[CellResult], rows: list[dict[str, Any]], retry: list[dict[str, Any]] = ()
) -> dict[str, float]:
    """Flat metrics for the study's MLflow run: held-out per method (mean over seeds), the pooled
    comparisons, and those at each self-correction Iter-k (``paired_iter<k>/…``) when the evaluation retried."""
    out: dict[str, float] = {}
    for point, methods in groups(results).items():
        pre = f"{bench_key(point)}/" if point else ""
        for m, by_seed in methods.items():
            finals = [h[0] for c in by_seed.values() if (h := held_out(c, final_iteration(c)))]
            starts = [h[0] for c in by_seed.values() if (h := held_out(c, 0))]
            if finals:
                out[f"heldout/{pre}{bench_key(m)}/final_mean"] = float(np.mean(finals))
            if starts:
                out[f"heldout/{pre}{bench_key(m)}/warmstart_mean"] = float(np.mean(starts))
    pooled = [("paired", r) for r in rows if r["scope"] == "pooled" and "error" not in r]
    for head, r in pooled + [(f"paired_iter{r['iteration']}", r) for r in retry]:
        pre = f"{head}/{bench_key(r['point'])}/" if r["point"] else f"{head}/"
        key = f"{pre}{bench_key(r['b'])}_vs_{bench_key(r['a'])}"
        out.update({f"{key}/{k}": float(r[k]) for k in ("diff", "ci_low", "ci_high", "p_value")})
    return out


def write(results: list[CellResult], out: Path, *, name: str, bootstrap: int, command: str) -> StageOutput:
    from stages.study.plots import learning_curves

    out.mkdir(parents=True, exist_ok=True)
    rows = comparisons(results, bootstrap)
    done = [c for c in results if c.completed]
    seeds = sorted({c.seed for c in results})
    methods = list(dict.fromkeys(c.method for c in results))
    md = [
        f"# Study `{name}`",
        "",
        f"{len(results)} cells ({len(done)} completed): methods {', '.join(methods)} × seeds "
        f"{', '.join(map(str, seeds))}" + (f" × {len({c.point for c in results})} grid points" if results[0].point
                                            else "") + ".",
        "Held-out: per-problem correctness from each run's stored evaluation (warm start = its iteration 0).",
        "",
        "## Cells",
        "",
        *cell_lines(results),
        "",
        "## Compute and shared inputs",
        "",
        *compute_lines(results),
        "",
    ]  # fmt: skip
    files: dict[str, Path] = {}
    if done:
        files["learning_curves"] = learning_curves(results, out / "learning_curves.png")
        md += ["## Learning curves", "", f"![learning curves]({files['learning_curves'].name})", ""]
    md += [
        "## Paired comparisons",
        "",
        "Final held-out evaluation against the warm start (the same runs' iteration 0), and method against method",
        "seed by seed, on the same problems. Δ: mean difference over problems × seeds; 95% CI: paired bootstrap",
        f"({bootstrap} resamples of problems, each with all its seeds); better / worse: (problem, seed) pairs that",
        "changed; p: exact two-sided sign test on them (McNemar's exact test on 0/1 scores). Both hold each seed's",
        "run fixed; the 'across seeds' row treats the seeds' own Δs as the sample instead (mean, Student-t 95%",
        "interval, seeds up / down), so run-to-run variation is in its width: with 2-3 seeds it is wide.",
        "",
        *(comparison_lines(rows) if rows else ["(no completed cells to compare)"]),
        "",
    ]
    retry_md, retry = self_correction(results, rows, bootstrap)
    md += retry_md
    heldout = heldout_lines(results)
    (out / "heldout.jsonl").write_text("".join(line + "\n" for line in heldout))
    md += [
        "Every evaluation's per-problem held-out scores are in `heldout.jsonl` (a line per cell and iteration), so",
        "any two can be paired again without the run store.",
        "",
    ]
    if command:
        md += ["## Reproduce", "", "```", command, "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    data = {"name": name, "cells": [cell_row(c) for c in results], "comparisons": rows}
    if retry:
        data["self_correction"] = retry
    (out / "results.json").write_text(json.dumps(data, indent=2, default=float))
    files = {"report": report, "results": out / "results.json", "heldout": out / "heldout.jsonl", **files}
    counts = {"heldout": len(heldout), "learning_curves": 0}
    tables = {
        k: TableRef(uri=str(p), sha256=sha256_file(p), rows=counts.get(k, len(results)))
        for k, p in files.items()
    }
    return StageOutput(
        stage="study",
        tables=tables,
        metrics=summary_metrics(results, rows, retry.get("comparisons", [])),
        notes=[f"report: {report}"],
    )
