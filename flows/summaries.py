"""Summaries for a person: what `turntree stage` and `turntree compare` print (``--json`` prints the result
itself), and a pipeline run's summary artifact in Prefect (its RL health table, links, warnings)."""

from __future__ import annotations

from typing import Any

from flows.console import overrides_text

SHOWN_METRICS = 8  # a rerun's summary lists this many of its metrics (all of them are in MLflow and --json)


def stage_summary(result: dict[str, Any]) -> str:
    """A stage rerun: what it wrote (version, tables), what it read, its overrides, a few metrics, and what is
    now stale downstream."""
    over = overrides_text(result.get("overrides") or {})
    lines = [
        f"run {result['run_id']}: {result['key']} rerun as {result['version']} (now current)"
        + (f" with {over}" if over else " with the recorded parameters")
    ]
    lines += [f"  read   {name}: {where}" for name, where in sorted(result.get("read", {}).items())]
    lines += [f"  moved  {line}" for line in result.get("rebased_inputs", [])]
    out = result.get("output", {})
    for name, ref in sorted(out.get("tables", {}).items()):
        lines.append(f"  wrote  {name}: {ref.get('rows', '?')} rows at {ref['uri']}")
    metrics = out.get("metrics", {})
    if metrics:
        shown = sorted(metrics.items())[:SHOWN_METRICS]
        more = len(metrics) - len(shown)
        lines.append(
            "  metrics " + ", ".join(f"{k} {v:.4g}" for k, v in shown) + (f" (+{more} more)" if more else "")
        )
    stale = result.get("stale") or {}
    if stale:
        lines.append(f"  now stale: {', '.join(sorted(stale))}")
        lines.append(
            "  (rerun them with `turntree stage`, or `turntree run` recomputes them from the current versions;"
            " `turntree runs RUN` shows every version)"
        )
    return "\n".join(lines)


def compare_summary(result: dict[str, Any]) -> str:
    """A comparison: held-out accuracy per entry and benchmark (the report has the CIs, tests and curves)."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in result.get("metrics", {}).items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "eval":
            rows.setdefault((parts[1], parts[2]), {})[parts[3]] = value
    lines = []
    if rows:
        stats = sorted({s for r in rows.values() for s in r})
        lines.append(f"{'benchmark':<24} {'entry':<16} " + " ".join(f"{s:>{max(len(s), 8)}}" for s in stats))
        for (bench, entry), r in sorted(rows.items()):
            cells = " ".join(f"{r.get(s, float('nan')):>{max(len(s), 8)}.4g}" for s in stats)
            lines.append(f"{bench:<24} {entry:<16} {cells}")
    lines.append(f"report: {result['report']}")
    lines.append(f"MLflow run: {result.get('mlflow_run_id', '?')}")
    return "\n".join(lines)


def _cell(v: Any, fmt: str = "{:.3f}") -> str:
    return "" if v is None else fmt.format(v)


def run_summary_md(ctx: Any, manifest: dict[str, Any], base: str, tracker: Any, warnings: list[str]) -> str:
    """The pipeline flow run's summary: where things are, the health table per iteration (held-out with its
    95% CI, training reward, zero-signal fraction, response length, truncation), the health chart and the
    completions of each iteration in MLflow, and the run's warnings."""
    from flows.console import format_headline
    from flows.health_view import health_rows

    parent = ctx.mlflow_parent
    lines = [
        f"# turntree run `{ctx.run_id}`",
        "",
        f"- algorithm: **{ctx.algo}**",
        f"- storage: `{base}`",
        f"- MLflow: [run {parent}]({tracker.run_url(parent)}) (tracking URI `{tracker.uri}`); "
        f"[health chart]({tracker.artifact_url(parent, 'health.png')})",
        f"- git: `{ctx.git_sha}`",
        "",
        "| iteration | held-out (95% CI) | reward | correct | zero-signal | tokens/turn | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in health_rows(manifest):
        held = format_headline(r["headline"]) if r["headline"] else ""
        cells = [str(r["iteration"]), held, _cell(r["reward"]), _cell(r["correct"], "{:.2f}")]
        cells += [_cell(r["zero_signal"], "{:.2f}"), _cell(r["response_tokens"], "{:.1f}")]
        cells += [_cell(r["truncated"], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    done = sorted(int(k[5:].split("/")[0]) for k in manifest["stages"] if k.endswith("/advantages"))
    if done and parent:
        views = [
            f"[iteration {k}]({tracker.artifact_url(parent, f'completions/iter-{k}.html')})" for k in done
        ]
        lines += ["", "Completions (every trajectory, turn by turn; sortable): " + ", ".join(views)]
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})", "", *(f"- {w}" for w in warnings)]
    return "\n".join(lines)
