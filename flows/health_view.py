"""The run's RL health view: one PNG (``health.png`` on the MLflow run, redrawn after every iteration) with
four panels read from the run's manifest:

- held-out accuracy (or pass@1) per evaluated iteration with its 95% CI band (iteration 0: the starting policy);
- training reward: mean reward and fraction correct of each iteration's rollout;
- zero-signal fraction: groups whose samples all tied (nothing to learn from them);
- response length: generated tokens per turn, and the fraction of turns cut by the token limit.

``health_rows`` gives the same series as rows (the Prefect summary's table).
"""

from __future__ import annotations

import io
import logging
from typing import Any

from flows.console import headline, iteration_metrics

log = logging.getLogger("turntree.health")


def log_health(tracker: Any, run_id: str | None, manifest: dict[str, Any]) -> None:
    """``health.png`` on the MLflow run; a failure to draw is a warning, never a failed run."""
    if not run_id:
        return
    try:
        png = health_png(manifest)
        if png:
            tracker.log_bytes(run_id, png, "health.png")
    except Exception as e:
        log.warning("could not draw the health chart: %s", e)


def health_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per iteration: held-out value/low/high, reward, correct, zero-signal, tokens, truncation."""
    rows = []
    for k, m in sorted(iteration_metrics(manifest).items()):
        h = headline(m)
        rows.append(
            {
                "iteration": k,
                "headline": h,  # flows.console.headline (None without an evaluation)
                "held_out": h["value"] if h else None,
                "held_out_low": h["low"] if h else None,
                "held_out_high": h["high"] if h else None,
                "reward": m.get("reward/mean"),
                "correct": m.get("reward/correct_frac", m.get("reward/pass_frac")),
                "zero_signal": m.get("adv/zero_signal_frac"),
                "response_tokens": m.get("rollout/response_tokens_mean"),
                "truncated": m.get("rollout/truncated_turn_frac"),
            }
        )
    return rows


def health_png(manifest: dict[str, Any]) -> bytes | None:
    """The four panels as PNG bytes; None before the first iteration's metrics exist."""
    rows = health_rows(manifest)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["iteration"], r[key]) for r in rows if r[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    ks, ys = series("held_out")
    band = [
        (r["iteration"], r["held_out_low"], r["held_out_high"]) for r in rows if r["held_out_low"] is not None
    ]
    if band:
        ax.fill_between(
            [b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.25, label="95% CI"
        )
    ax.plot(ks, ys, "o-", label="held-out")
    ax.set(title="held-out accuracy", xlabel="iteration", ylim=(0, 1))
    ax.legend(loc="lower right")
    ax = axes[0][1]
    for key, label in (("reward", "mean reward"), ("correct", "fraction correct")):
        ax.plot(*series(key), "o-", label=label)
    ax.set(title="training rollouts", xlabel="iteration")
    ax.legend(loc="lower right")
    ax = axes[1][0]
    ax.plot(*series("zero_signal"), "o-", color="tab:red")
    ax.set(title="zero-signal fraction (tied groups)", xlabel="iteration", ylim=(0, 1))
    ax = axes[1][1]
    ax.plot(*series("response_tokens"), "o-", label="tokens per turn")
    ax.set(title="response length", xlabel="iteration", ylabel="tokens")
    twin = ax.twinx()
    twin.plot(*series("truncated"), "s--", color="tab:gray", label="truncated turns")
    twin.set(ylabel="fraction truncated", ylim=(0, 1))
    ax.legend(loc="upper left")
    twin.legend(loc="upper right")
    for a in axes.flat:
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
