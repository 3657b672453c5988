"""Comparison report: several evaluated checkpoints or runs (e.g. GRPO vs GTPO vs MURPHY from the same base) on
the same problems → one markdown table, PNG plots, and headline metrics.

    compare({"grpo": ".../eval.parquet", "murphy": ...}, out, mlflow_metric_history=...) -> StageOutput
        out/report.md                   the table (pass@1 per iteration with 95% bootstrap CIs, accuracy, turns)
        out/pass_at_1_vs_iteration.png  pass@1 vs self-correction iteration, one line per method, CI error bars
        out/reward_curves.png           training curves per method (when metric histories are given)

``metric_histories(run_ids)`` reads those curves from MLflow (``MlflowClient.get_metric_history``). Plots use
matplotlib's Agg backend (no display needed). The flow (flows/compare.py) logs the files to MLflow and
publishes the markdown as a Prefect artifact; this module never imports prefect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from maths.eval_metrics import bench_key, group_metrics, paired_bootstrap_diff, problem_scores, sample_records
from runtime.tableio import read_table, sha256_file
from schemas.outputs import StageOutput, TableRef
from schemas.tables import EVAL_RESULTS

# A history: method -> metric name -> [(step, value), ...] in step order.
History = Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]
DEFAULT_CURVES: tuple[str, ...] = ("reward/mean", "rollout/pass_rate", "actor/loss")


def metric_histories(
    run_ids: Mapping[str, str], metrics: Sequence[str] = DEFAULT_CURVES, tracking_uri: str | None = None
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Training curves from MLflow: {method: {metric: [(step, value), ...]}} for the given run ids.

    Metrics a run never logged are left out (not an error); an unknown run id raises with the method named.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri) if tracking_uri else MlflowClient()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for method, run_id in run_ids.items():
        try:
            client.get_run(run_id)
        except Exception as e:
            raise ValueError(f"method {method!r}: MLflow run {run_id!r} not found: {e}") from None
        curves = {}
        for name in metrics:
            hist = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
            if hist:
                curves[name] = [(int(m.step), float(m.value)) for m in hist]
        out[method] = curves
    return out


# --- numbers -------------------------------------------------------------------------------------------------
def method_summaries(
    eval_tables: Mapping[str, str], *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {benchmark: metrics}} where metrics are group_metrics' (pass_at_1_attempt<k> with CIs, …).

    Iterations per benchmark = the largest attempt number in that benchmark's rows (1 for math).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, uri in eval_tables.items():
        table = read_table(uri, EVAL_RESULTS)
        if table.num_rows == 0:
            raise ValueError(f"method {method!r}: eval table {uri} has no rows")
        records = sample_records(table)
        by_bench: dict[str, list[dict]] = {}
        for rec in records:
            by_bench.setdefault(rec["benchmark"], []).append(rec)
        out[method] = {}
        for bench, recs in sorted(by_bench.items()):
            k = max(r["attempts"] for r in recs)
            out[method][bench] = group_metrics(
                recs, kind="code", iterations=k, bootstrap=bootstrap, seed=seed
            )
    return out


def _iters(m: Mapping[str, float]) -> int:
    k = 0
    while f"pass_at_1_attempt{k + 1}" in m:
        k += 1
    return k


def _fmt(m: Mapping[str, float], key: str) -> str:
    if key not in m:
        return "–"
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    if lo is None or hi is None or math.isclose(lo, hi):
        return f"{m[key]:.3f}"
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(summaries: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per (method, benchmark): problems, n, pass@1 at Iter-1..Iter-K with 95% CIs, gain, turns."""
    k_max = max((_iters(m) for per in summaries.values() for m in per.values()), default=1)
    head = ["method", "benchmark", "problems", "n"] + [f"Iter-{k} pass@1" for k in range(1, k_max + 1)]
    head += ["Δ Iter-K − Iter-1", "avg turns", "avg tool calls"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, per in summaries.items():
        for bench, m in per.items():
            k = _iters(m)
            gain = m[f"pass_at_1_attempt{k}"] - m["pass_at_1_attempt1"] if k else float("nan")
            cells = [method, bench, f"{m['problems']:.0f}", f"{m['samples_per_problem']:.0f}"]
            cells += [_fmt(m, f"pass_at_1_attempt{i}") for i in range(1, k_max + 1)]
            cells += [f"{gain:+.3f}", f"{m['avg_turns']:.2f}", f"{m['avg_tool_calls']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_pass_vs_iteration(summaries: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    """One panel per benchmark: pass@1 (y) vs iteration (x), one line per method, 95% CI error bars."""
    plt = _pyplot()
    benches = sorted({b for per in summaries.values() for b in per})
    fig, axes = plt.subplots(1, len(benches), figsize=(5 * len(benches), 4), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        for i, (method, per) in enumerate(summaries.items()):
            m = per.get(bench)
            if not m:
                continue
            ks = list(range(1, _iters(m) + 1))
            y = [m[f"pass_at_1_attempt{k}"] for k in ks]
            lo = [y[j] - m.get(f"pass_at_1_attempt{k}_ci_low", y[j]) for j, k in enumerate(ks)]
            hi = [m.get(f"pass_at_1_attempt{k}_ci_high", y[j]) - y[j] for j, k in enumerate(ks)]
            x = [k + (i - (len(summaries) - 1) / 2) * 0.04 for k in ks]  # small dodge so bars don't overlap
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4, label=method)
        ax.set_title(f"{bench}")
        ax.set_xlabel("self-correction iteration k")
        ax.set_ylabel("pass@1 at Iter-k (95% CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(
            range(1, max((_iters(p[bench]) for p in summaries.values() if bench in p), default=1) + 1)
        )
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(history: History, path: Path) -> Path:
    """One panel per metric: value vs step, one line per method."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    names = sorted({name for curves in history.values() for name in curves})
    if not names:
        raise ValueError("no metric history to plot (every method's curves are empty)")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for method, curves in history.items():
            pts = curves.get(name)
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=method)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- entry -------------------------------------------------------------------------------------------------
def compare(
    eval_tables: Mapping[str, str],
    out: Path,
    mlflow_metric_history: History | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    title: str = "turntree comparison",
) -> StageOutput:
    """Write report.md and PNGs for ``eval_tables`` ({method: eval_results uri}) into ``out``.

    Returns a StageOutput whose tables are the report and the PNGs (rows = methods for the report, 0 for
    images) and whose metrics are ``eval/<bench>/<method>/pass_at_1_attempt<k>`` (+ CIs) per method.
    """
    if not eval_tables:
        raise ValueError("compare needs at least one {method: eval_results uri}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = method_summaries(eval_tables, bootstrap=bootstrap, seed=seed)
    files = {"pass_vs_iteration": plot_pass_vs_iteration(summaries, out / "pass_at_1_vs_iteration.png")}
    has_curves = bool(mlflow_metric_history) and any(c for c in mlflow_metric_history.values())
    if has_curves:
        files["reward_curves"] = plot_curves(mlflow_metric_history, out / "reward_curves.png")

    md = [
        f"# {title}",
        "",
        "pass@1 at self-correction iteration k (Iter-k): a problem counts as solved at k if any",
        "of its first k attempts passes all tests; brackets: 95% bootstrap CI over problems.",
        "",
    ]
    md += [markdown_table(summaries), "", f"![pass@1 vs iteration]({files['pass_vs_iteration'].name})", ""]
    paired_md, paired_metrics = paired_differences(eval_tables, bootstrap=bootstrap, seed=seed)
    md += paired_md
    if has_curves:
        md += ["## Training curves", "", f"![training curves]({files['reward_curves'].name})", ""]
    md += ["## Sources", ""] + [f"- {method}: `{uri}`" for method, uri in eval_tables.items()]
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")

    tables = {"report": TableRef(uri=str(report), sha256=sha256_file(report), rows=len(summaries))}
    tables.update({name: TableRef(uri=str(p), sha256=sha256_file(p), rows=0) for name, p in files.items()})
    metrics = {}
    for method, per in summaries.items():
        for bench, m in per.items():
            for key, value in m.items():
                if key.startswith("pass_at_1_attempt"):
                    metrics[f"eval/{bench_key(bench)}/{bench_key(method)}/{key}"] = value
    metrics.update(paired_metrics)
    return StageOutput(stage="compare", tables=tables, metrics=metrics, notes=[f"report: {report}"])


def paired_differences(
    eval_tables: Mapping[str, str], *, bootstrap: int = 1000, seed: int = 0
) -> tuple[list[str], dict[str, float]]:
    """Each method against the first one, per benchmark, on the problems both evaluated: the difference of
    pass@1 at Iter-1 and at the last iteration with a paired bootstrap 95% CI (markdown lines, metrics)."""
    methods = list(eval_tables)
    if len(methods) < 2:
        return [], {}
    records = {m: sample_records(read_table(uri, EVAL_RESULTS)) for m, uri in eval_tables.items()}
    base = methods[0]
    lines = [
        f"## Paired differences against `{base}`",
        "",
        "Same problems, paired bootstrap 95% CI of the difference of per-problem pass@1; a CI that excludes 0",
        "is a difference the problem sample cannot explain.",
        "",
        "| method | benchmark | problems | Δ Iter-1 pass@1 [95% CI] | Δ Iter-K pass@1 [95% CI] |",
        "|---|---|---|---|---|",
    ]
    metrics: dict[str, float] = {}
    for method in methods[1:]:
        for bench in sorted({r["benchmark"] for r in records[method]}):
            a = [r for r in records[base] if r["benchmark"] == bench]
            b = [r for r in records[method] if r["benchmark"] == bench]
            if not a:
                continue
            k = max(r["attempts"] for r in a + b)
            cells = []
            for it in (1, k):
                d = paired_bootstrap_diff(problem_scores(a, it), problem_scores(b, it), resamples=bootstrap, seed=seed)
                cells.append(f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
                prefix = f"eval/{bench_key(bench)}/{bench_key(method)}_vs_{bench_key(base)}/diff_attempt{it}"
                metrics.update({prefix: d["diff"], f"{prefix}_ci_low": d["ci_low"], f"{prefix}_ci_high": d["ci_high"]})
            lines.append(f"| {method} | {bench} | {d['problems']:.0f} | {cells[0]} | {cells[1]} |")
    return lines + [""], metrics
