"""Evaluation metrics: the unbiased pass@k estimator, bootstrap confidence intervals, and the aggregation of an
``eval_results`` table (schemas.tables.EVAL_RESULTS) into namespaced ``eval/<bench>/*`` metrics.

Definitions (docs/algorithms.md, "Evaluation"):

- A *sample* is one independent run of the self-correction loop on a problem: attempt 1 from the task prompt,
  then, while it fails and fewer than K attempts were made, another attempt from the feedback prompt.
  A sample is **solved at iteration k** if any of its first k attempts passes all tests.
- ``pass_at_1_attempt<k>`` = mean over problems of (samples solved at k) / n — the unbiased pass@1 at Iter-k.
- ``pass_at_<k>`` (n > 1 only) = mean over problems of the unbiased pass@k estimator of Chen et al. 2021
  (arXiv 2107.03374), 1 − C(n−c, k) / C(n, k), on first attempts (c = samples passing at attempt 1).
- ``accuracy`` (math) = mean over problems of the fraction of samples whose final answer is right.
- Bootstrap CIs resample *problems* with replacement (the unit that varies between benchmarks), percentile
  method, 95 % by default.

Metric names use ``pass_at_`` instead of ``pass@``: MLflow refuses ``@`` in metric names (it accepts letters,
digits, ``_ - . : /`` and spaces). Benchmark names are made safe the same way by ``bench_key``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa

# k values reported for pass@k when n > 1 (those <= n); n itself is always added.
PASS_AT_KS: tuple[int, ...] = (2, 5, 10, 20, 50, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − ∏_{i=n−c+1..n} (1 − k/i), which is exact and never forms large binomials.
    Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def bootstrap_ci(
    values: np.ndarray | list[float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (P,) — one value per problem.

    Returns (low, high). With ``resamples`` == 0 or fewer than 2 values the interval collapses to the mean.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {v.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(v.mean())
    if resamples <= 0 or v.size < 2:
        return mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // v.size)  # bound memory: (chunk, P) index matrices
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bench_key(benchmark: str) -> str:
    """A benchmark name usable inside an MLflow metric name: 'synthetic:func-synth' -> 'synthetic-func-synth'."""
    key = re.sub(r"[^\w.\-]+", "-", benchmark.strip()).strip("-")
    return key or "benchmark"


# --- per-sample view of an eval_results table --------------------------------------------------------------


def sample_records(rows: pa.Table | Iterable[Mapping]) -> list[dict]:
    """Collapse per-attempt rows into one record per (benchmark, problem_id, sample_idx).

    Each record: benchmark, problem_id, sample_idx, difficulty, attempts (int), first_pass (1-based attempt
    that passed first, 0 if none), turns (sum of num_turns), tool_calls (sum of num_tool_calls).
    """
    if isinstance(rows, pa.Table):
        rows = rows.select(
            [
                "benchmark",
                "problem_id",
                "sample_idx",
                "attempt",
                "passed",
                "num_turns",
                "num_tool_calls",
                "difficulty",
            ]
        ).to_pylist()
    recs: dict[tuple, dict] = {}
    for r in rows:
        key = (r["benchmark"], r["problem_id"], int(r["sample_idx"]))
        rec = recs.setdefault(
            key,
            {
                "benchmark": r["benchmark"],
                "problem_id": r["problem_id"],
                "sample_idx": int(r["sample_idx"]),
                "difficulty": r.get("difficulty"),
                "attempts": 0,
                "first_pass": 0,
                "turns": 0,
                "tool_calls": 0,
            },
        )
        attempt = int(r["attempt"])
        if attempt < 1:
            raise ValueError(f"eval_results row for {key}: attempt must be >= 1, got {attempt}")
        rec["attempts"] = max(rec["attempts"], attempt)
        rec["turns"] += int(r["num_turns"])
        rec["tool_calls"] += int(r["num_tool_calls"])
        if r["passed"] and (rec["first_pass"] == 0 or attempt < rec["first_pass"]):
            rec["first_pass"] = attempt
    return list(recs.values())


def _per_problem(records: list[dict]) -> dict[str, list[dict]]:
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_problem[rec["problem_id"]].append(rec)
    return by_problem


def iteration_curve(records: list[dict], iterations: int) -> np.ndarray:
    """Per-problem pass@1 at Iter-1..Iter-K: array (P, K), entry [p, k-1] = solved-at-k samples / n."""
    by_problem = _per_problem(records)
    out = np.zeros((len(by_problem), iterations), dtype=np.float64)
    for p, recs in enumerate(by_problem.values()):
        first = np.array([r["first_pass"] for r in recs])
        for k in range(1, iterations + 1):
            out[p, k - 1] = np.mean((first >= 1) & (first <= k))
    return out


def _with_ci(prefix: str, per_problem: np.ndarray, bootstrap: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_ci(per_problem, resamples=bootstrap, seed=seed)
    return {prefix: float(per_problem.mean()), f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}


def group_metrics(
    records: list[dict], *, kind: str, iterations: int, bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Metrics of one group of sample records (one benchmark, or one difficulty of it), names unprefixed.

    kind "code": pass_at_1_attempt1..K with CIs; kind "math": accuracy with CI (and pass_at_1_attempt1, equal to
    it, so plots treat both kinds alike). Both: pass_at_<k> (n > 1), avg_turns, avg_tool_calls, problems,
    samples_per_problem.
    """
    if not records:
        return {}
    by_problem = _per_problem(records)
    n_per = [len(v) for v in by_problem.values()]
    k_max = iterations if kind == "code" else 1
    curve = iteration_curve(records, k_max)
    m: dict[str, float] = {"problems": float(len(by_problem)), "samples_per_problem": float(min(n_per))}
    for k in range(1, k_max + 1):
        m.update(_with_ci(f"pass_at_1_attempt{k}", curve[:, k - 1], bootstrap, seed + k))
    if kind == "math":
        m.update(_with_ci("accuracy", curve[:, 0], bootstrap, seed + 1))
    n = min(n_per)
    if n > 1:
        for k in sorted({kk for kk in PASS_AT_KS if kk <= n} | {n}):
            vals = np.array(
                [
                    pass_at_k(len(recs), sum(r["first_pass"] == 1 for r in recs), k)
                    for recs in by_problem.values()
                ]
            )
            m.update(_with_ci(f"pass_at_{k}", vals, bootstrap, seed + 100 + k))
    m["avg_turns"] = float(np.mean([r["turns"] for r in records]))
    m["avg_tool_calls"] = float(np.mean([r["tool_calls"] for r in records]))
    return m


def summarize(
    rows: pa.Table | Iterable[Mapping],
    *,
    kinds: Mapping[str, str],
    iterations: int,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """All ``eval/<bench>/*`` metrics of an eval_results table.

    kinds: problem_id -> "code" | "math" (problems missing from it count as code). A benchmark mixing both
    kinds reports code metrics over its code problems and math metrics over its math problems. Per-difficulty
    splits go under ``eval/<bench>/difficulty/<d>/`` when a benchmark has more than one difficulty value.
    """
    records = sample_records(rows)
    by_bench: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_bench[rec["benchmark"]].append(rec)
    out: dict[str, float] = {}
    for bench, recs in by_bench.items():
        prefix = f"eval/{bench_key(bench)}"
        by_kind: dict[str, list[dict]] = defaultdict(list)
        for rec in recs:
            by_kind[kinds.get(rec["problem_id"], "code")].append(rec)
        for kind, krecs in by_kind.items():
            opts = dict(kind=kind, iterations=iterations, bootstrap=bootstrap, seed=seed)
            m = group_metrics(krecs, **opts)
            if len(by_kind) > 1:  # mixed benchmark: keep the two kinds apart
                m = {f"{kind}/{k}": v for k, v in m.items()}
            out.update({f"{prefix}/{k}": v for k, v in m.items()})
            difficulties = {r["difficulty"] for r in krecs if r["difficulty"] not in (None, "")}
            if len(difficulties) > 1:
                for d in sorted(difficulties):
                    dm = group_metrics([r for r in krecs if r["difficulty"] == d], **opts)
                    out.update({f"{prefix}/difficulty/{bench_key(d)}/{k}": v for k, v in dm.items()})
    return {k: v for k, v in out.items() if math.isfinite(v)}


def paired_bootstrap_diff(
    a: Mapping[str, float], b: Mapping[str, float], *, resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Difference of the means of ``b`` − ``a`` over the problems both scored ({problem_id: score}), with a paired
    percentile bootstrap CI: the same resampled problems enter both means, so the problems' own difficulty
    cancels out (two checkpoints on the same held-out problems). Returns diff, ci_low, ci_high, problems,
    and ``p_le_0``: the fraction of resamples whose difference is ≤ 0 (one-sided evidence that b is better)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("paired_bootstrap_diff: the two evaluations share no problem")
    d = np.array([float(b[p]) - float(a[p]) for p in common], dtype=np.float64)
    low, high = bootstrap_ci(d, resamples=resamples, seed=seed, level=level)
    if resamples > 0 and d.size > 1:
        rng = np.random.default_rng(seed + 1)
        means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
        p_le_0 = float((means <= 0).mean())
    else:
        p_le_0 = float(d.mean() <= 0)
    return {"diff": float(d.mean()), "ci_low": low, "ci_high": high, "problems": float(d.size), "p_le_0": p_le_0}


def problem_scores(records: list[dict], iteration: int = 1) -> dict[str, float]:
    """{problem_id: pass@1 at Iter-``iteration``} (math: accuracy) of sample records, for paired comparisons."""
    by_problem = _per_problem(records)
    return {
        pid: float(np.mean([(r["first_pass"] >= 1) & (r["first_pass"] <= iteration) for r in recs]))
        for pid, recs in by_problem.items()
    }
