"""The study's self-correction table: pass@1 at Iter-1..Iter-K (the MURPHY paper's table shape) when the
held-out evaluation lets the policy retry from the test feedback (``eval.iterations`` > 1 on code problems).

Iter-k counts a problem solved if any of its first k attempts passes (``maths.eval_metrics.problem_scores``), so
each column is a per-problem 0/1 score like the main table's and pairs the same way (``maths.paired``): per
cell its warm start's and its final evaluation's pass@1 at every k, then per grid point and k each method's
final against its warm start and each pair of methods against each other, pooled over seeds.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from maths.paired import paired_comparison
from stages.study import CellResult, attempts, scores


def depth(results: list[CellResult]) -> int:
    """K: the most attempts any completed cell's evaluation gave a problem (1: nothing to tabulate)."""
    uris = [u for c in results if c.completed for u in c.evals.values()]
    return max((attempts(u) for u in uris), default=1)


def _final(c: CellResult) -> int | None:
    return max(c.evals) if c.evals else None


def _acc(uri: str | None, k: int) -> float | None:
    s = scores(uri, k) if uri else {}
    return float(np.mean(list(s.values()))) if s else None


def cell_rows(results: list[CellResult], k_max: int) -> list[dict[str, Any]]:
    """Per completed cell: pass@1 at Iter-1..K of its warm start (iteration 0) and of its final evaluation."""
    rows = []
    for c in results:
        if not c.completed:
            continue
        f = _final(c)
        rows.append({
            "run_id": c.run_id, "method": c.method, "seed": c.seed, "point": c.point, "final_iteration": f,
            "warmstart": [_acc(c.evals.get(0), k) for k in range(1, k_max + 1)],
            "final": [_acc(c.evals.get(f) if f else None, k) for k in range(1, k_max + 1)],
        })  # fmt: skip
    return rows


Groups = dict[str, dict[str, dict[int, CellResult]]]  # {grid point: {method: {seed: completed cell}}}


def comparisons(grouped: Groups, k_max: int, bootstrap: int) -> list[dict[str, Any]]:
    """Per grid point and Iter-k (pooled over seeds): each method's final against its warm start, then each
    pair of methods' finals. ``grouped``: the completed cells as ``stages.study.report.groups`` orders them."""
    out: list[dict[str, Any]] = []
    for point, methods in grouped.items():
        pairs: list[tuple[str, str, list[tuple[str, str]]]] = []
        for m, by_seed in methods.items():
            fin = {s: c for s, c in by_seed.items() if 0 in c.evals and _final(c)}
            pairs.append(
                ("warm start", m, [(c.evals[0], c.evals[_final(c)]) for _, c in sorted(fin.items())])
            )
        for m1, m2 in itertools.combinations(methods, 2):
            seeds = sorted(s for s in set(methods[m1]) & set(methods[m2]) if _final(methods[m1][s])
                           and _final(methods[m2][s]))  # fmt: skip
            ev = [(methods[m1][s].evals[_final(methods[m1][s])], methods[m2][s].evals[_final(methods[m2][s])])
                  for s in seeds]  # fmt: skip
            pairs.append((m1, m2, ev))
        for a, b, ev in pairs:
            if not ev:
                continue
            for k in range(1, k_max + 1):
                sa, sb = [scores(x, k) for x, _ in ev], [scores(y, k) for _, y in ev]
                common = sorted(set.intersection(*(set(x) & set(y) for x, y in zip(sa, sb, strict=True))))
                if not common:
                    continue
                A = np.array([[x[p] for p in common] for x in sa])
                B = np.array([[y[p] for p in common] for y in sb])
                stats = paired_comparison(A, B, resamples=bootstrap, seed=0)
                out.append({**stats, "point": point, "a": a, "b": b, "iteration": k, "seeds": len(ev)})
    return out


def lines(results: list[CellResult], grouped: Groups, bootstrap: int) -> tuple[list[str], dict[str, Any]]:
    """The report's Markdown section and its results.json entry; nothing when no evaluation retried."""
    k_max = depth(results)
    if k_max < 2:
        return [], {}
    cells, rows = cell_rows(results, k_max), comparisons(grouped, k_max, bootstrap)
    ks = range(1, k_max + 1)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    md = [
        "## Self-correction: pass@1 at Iter-1..Iter-" + str(k_max),
        "",
        "Iter-k: a problem counts as solved if one of its first k attempts passes, each retry prompted with the",
        "failed attempt's test feedback (the MURPHY paper's table). Warm start = the cell's iteration 0.",
        "",
        "| cell | method | seed | "
        + " | ".join(f"warm start Iter-{k}" for k in ks)
        + " | "
        + " | ".join(f"final Iter-{k}" for k in ks)
        + " |",
        "|" + "---|" * (3 + 2 * k_max),
    ]
    for r in cells:
        md.append(f"| `{r['run_id']}` | {r['method']} | {r['seed']} | "
                  + " | ".join(fmt(v) for v in r["warmstart"] + r["final"]) + " |")  # fmt: skip
    md += ["", "| comparison | Iter-k | pairs | Δ pass@1 [95% CI] | better / worse | p (exact sign test) |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        label = f"{r['b']} − {r['a']}" + (f" ({r['point']})" if r["point"] else "")
        md.append(
            f"| {label} | {r['iteration']} | {r['pairs']:.0f} | {r['diff']:+.3f} [{r['ci_low']:+.3f}, "
            f"{r['ci_high']:+.3f}] | {r['wins']:.0f} / {r['losses']:.0f} | {r['p_value']:.3g} |"
        )
    return md + [""], {"iterations": k_max, "cells": cells, "comparisons": rows}
