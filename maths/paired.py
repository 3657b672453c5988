"""Paired comparisons of evaluations on the same problems, pooled over training seeds (``turntree study``).

- ``sign_test(wins, losses)``: the exact two-sided sign test. On binary outcomes (each problem solved or not by
  each of two evaluations) it is McNemar's exact test: only the discordant pairs count, and under "no
  difference" each goes either way with probability 1/2.
- ``paired_comparison(a, b)``: scores (S, P) of S seeds × P problems for two evaluations → the mean difference
  b − a over the S·P pairs, a percentile bootstrap 95% CI that resamples *problems* (each with all of its
  seeds: one problem's seeds are not independent draws), and the sign test on the S·P pairs.
- ``mean_ci(values)``: the mean of a few seeds' values with its Student-t 95% interval (the band of a
  learning curve across seeds).
- ``across_seeds(deltas)``: one Δ per seed as the sample (``mean_ci``, and how many seeds went each way): the
  interval that includes run-to-run variation, which the pooled bootstrap leaves out.

Pure integer and numpy arithmetic; no scipy.
"""

from __future__ import annotations

import math

import numpy as np

from maths.eval_metrics import bootstrap_ci

# Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the Cornish-Fisher expansion in ``t975``).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959963984540054


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of the sign test: p = min(1, 2 · P(X ≤ min(wins, losses))), X ~ Bin(n, 1/2),
    n = wins + losses (ties are left out before). n = 0: p = 1. E.g. 7 wins, 1 loss: 2 · 9/256 = 0.0703.

    Computed with exact integers (Σ C(n, i) against 2^n), so it stays exact for any n."""
    wins, losses = int(wins), int(losses)
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test needs counts >= 0, got wins={wins}, losses={losses}")
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, (2 * tail) / (1 << n))


def discordant(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(wins, losses): pairs where b scored above a, and below. a, b: equal-shape arrays of scores."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"discordant: shapes differ, {a.shape} vs {b.shape}")
    return int((b > a).sum()), int((b < a).sum())


def paired_comparison(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """b − a on the same problems, pooled over seeds.

    a, b: (S, P) per-problem scores (pass@1 or accuracy, in [0, 1]) of S seeds × P problems, problem j the same
    problem in every row. Returns ``diff`` (mean over the S·P pairs), ``ci_low`` / ``ci_high`` (percentile
    bootstrap over problems, each resampled problem bringing all its seeds), ``wins`` / ``losses`` (pairs where
    b scored above / below a), ``p_value`` (exact two-sided sign test on them: McNemar's on binary scores),
    ``pairs`` (S·P), ``seeds`` (S) and ``problems`` (P).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = np.atleast_2d(a), np.atleast_2d(b)  # one seed: (P,) -> (1, P)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(
            f"paired_comparison needs equal non-empty (seeds, problems) arrays: {a.shape}, {b.shape}"
        )
    d = b - a
    low, high = bootstrap_ci(d.mean(axis=0), resamples=resamples, seed=seed, level=level)
    wins, losses = discordant(a, b)
    return {
        "diff": float(d.mean()),
        "ci_low": low,
        "ci_high": high,
        "wins": float(wins),
        "losses": float(losses),
        "p_value": sign_test(wins, losses),
        "pairs": float(d.size),
        "seeds": float(d.shape[0]),
        "problems": float(d.shape[1]),
    }


def t975(df: int) -> float:
    """Student t quantile t_{0.975, df} (df ≥ 1): a table to df 30, then the Cornish-Fisher expansion
    z + (z³ + z)/(4 df) + (5z⁵ + 16z³ + 3z)/(96 df²) (within 1e-4 of the exact value at df 31, closer beyond)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` (one per seed) with its Student-t 95% interval,
    mean ± t_{0.975, n−1} · s / √n; one value: the interval collapses to it."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(v.mean())
    if v.size < 2:
        return mean, mean, mean
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


def across_seeds(deltas) -> dict[str, float | None]:
    """The seeds' own Δs as the sample: their mean with a Student-t 95% interval, and how many went each way.
    Unlike the pooled bootstrap (problems resampled, every seed's run held fixed) its width includes
    run-to-run variation; with 2-3 seeds it is wide, and no p-value is given."""
    deltas = np.asarray(deltas, dtype=np.float64).ravel()
    mean, low, high = mean_ci(deltas)
    return {
        "diff": mean,
        "ci_low": low,
        "ci_high": high,
        "wins": float((deltas > 0).sum()),
        "losses": float((deltas < 0).sum()),
        "p_value": None,
        "pairs": float(len(deltas)),
    }
