"""Learning curves of a study (matplotlib, Agg backend: no display needed).

Two panels, one line per method (per grid point when there is a grid) with its 95% band:
- training reward (``reward/mean`` of each iteration's scored rollout): the mean over seeds with the Student-t
  interval across seeds (``maths.paired.mean_ci``; one seed: no band);
- held-out accuracy after each evaluated iteration (0: the warm start): the mean over problems × seeds with a
  percentile bootstrap interval over problems, each bringing all its seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maths.eval_metrics import bootstrap_ci
from maths.paired import mean_ci
from stages.study import CellResult, scores

PLOT_RESAMPLES = 2000


def _series(results: list[CellResult]) -> dict[str, list[CellResult]]:
    """{line label: its completed cells (one per seed)}."""
    out: dict[str, list[CellResult]] = {}
    for c in results:
        if c.completed:
            out.setdefault(c.method + (f" [{c.point}]" if c.point else ""), []).append(c)
    return out


def reward_curve(cells: list[CellResult]) -> tuple[list[int], list[tuple[float, float, float]]]:
    """Iterations and (mean, low, high) of the training reward across the cells (seeds)."""
    ks = sorted({k for c in cells for k, m in c.metrics.items() if k >= 1 and "reward/mean" in m})
    pts = [
        mean_ci([c.metrics[k]["reward/mean"] for c in cells if "reward/mean" in c.metrics.get(k, {})])
        for k in ks
    ]
    return ks, pts


def heldout_curve(cells: list[CellResult]) -> tuple[list[int], list[tuple[float, float, float]]]:
    """Evaluated iterations and (mean, low, high) of held-out accuracy over problems × seeds."""
    ks = sorted(set.intersection(*(set(c.evals) for c in cells))) if cells else []
    pts = []
    for k in ks:
        per_seed = [scores(c.evals[k]) for c in cells]
        common = sorted(set.intersection(*(set(s) for s in per_seed)))
        if not common:
            continue
        per_problem = np.array([[s[p] for p in common] for s in per_seed]).mean(axis=0)
        low, high = bootstrap_ci(per_problem, resamples=PLOT_RESAMPLES, seed=k)
        pts.append((float(per_problem.mean()), low, high))
    return ks[: len(pts)], pts


def learning_curves(results: list[CellResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = _series(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (axes[0], reward_curve, "training reward (mean over the iteration's samples)", "band: 95% t-interval across seeds"),
        (axes[1], heldout_curve, "held-out accuracy (0: warm start)", "band: 95% bootstrap over problems × seeds"),
    )  # fmt: skip
    last = max((c.iterations for cs in series.values() for c in cs), default=1)
    for ax, curve, title, band in panels:
        for i, (label, cells) in enumerate(series.items()):
            ks, pts = curve(cells)
            if not ks:
                continue
            y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
            x = np.array(ks) + (i - (len(series) - 1) / 2) * 0.03  # a small dodge: equal lines stay visible
            color = f"C{i}"
            ax.plot(x, y, marker="o", color=color, label=f"{label} (n={len(cells)} seeds)")
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"iteration   ({band})", fontsize=8)
        ax.set_xlim(-0.3, last + 0.3)
        if last <= 20:
            ax.set_xticks(range(last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
