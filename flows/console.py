"""What `turntree` shows on the terminal: one live progress display per long stage (``runtime.progress``
reports) and the story of a finished run read back from its manifest: a table per iteration, the held-out
accuracy before → after, and links that work.

Imports only the standard library and the stage table (``stages``, a dataclass) at module level (rich is
imported when a terminal asks for bars), so the CLI stays fast to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from stages import PIPELINE_STAGES

# Without a terminal: a line per running stage every this many seconds (env TURNTREE_PROGRESS_EVERY).
LINE_EVERY_S = 30.0


# --- live progress ------------------------------------------------------------------------------------------
class LineProgress:
    """``runtime.progress`` hook for logs and pipes: a stage that runs longer than ``every`` seconds prints a
    line every ``every`` seconds (done/total, elapsed, ETA; "running" before its first report: ``tick`` prints
    those, so a stage that reports rarely still shows it is alive) and one when it finishes; quick stages print
    nothing."""

    def __init__(self, stream: TextIO | None = None, every: float = LINE_EVERY_S, clock=time.monotonic):
        self.stream, self.every, self.clock = stream or sys.stderr, every, clock
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.state: dict[str, tuple[int, int, str]] = {}
        self.printed: set[str] = set()
        self.lock = threading.Lock()

    def begin(self, stage: str) -> None:
        with self.lock:
            self._start(stage, self.clock())

    def end(self, stage: str) -> None:
        with self.lock:
            if stage in self.started:
                self._finish(stage, self.clock() - self.started[stage], "")

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        with self.lock:
            now = self.clock()
            self._start(stage, now)
            self.state[stage] = (done, total, message)
            if total and done >= total:
                self._finish(stage, now - self.started[stage], f"{done}/{total} {message}")
            elif now - self.last[stage] >= self.every:
                self._status(stage, now)

    def tick(self) -> None:
        """A line for each stage that has been silent for ``every`` seconds (a thread calls this every second)."""
        with self.lock:
            now = self.clock()
            for stage in [s for s, t in self.last.items() if now - t >= self.every]:
                self._status(stage, now)

    def _start(self, stage: str, now: float) -> None:
        if stage not in self.started:
            self.started[stage] = self.last[stage] = now
            self.state[stage] = (0, 0, "")

    def _status(self, stage: str, now: float) -> None:
        done, total, message = self.state[stage]
        elapsed = now - self.started[stage]
        if total:
            eta = f", ~{elapsed / done * (total - done):.0f}s left" if done else ""
            self._line(f"{stage}: {done}/{total} {message} ({elapsed:.0f}s{eta})")
        else:
            self._line(f"{stage}: running ({elapsed:.0f}s)")
        self.last[stage] = now
        self.printed.add(stage)

    def _finish(self, stage: str, elapsed: float, what: str) -> None:
        if stage in self.printed:
            self._line(f"{stage}: done{' ' + what.strip() if what.strip() else ''} in {elapsed:.0f}s")
        self.started.pop(stage), self.last.pop(stage), self.state.pop(stage), self.printed.discard(stage)

    def _line(self, text: str) -> None:
        # written, not print()ed: inside a Prefect task run (log_prints) print() becomes a log record
        self.stream.write(f"  {text}\n")
        self.stream.flush()


@contextlib.contextmanager
def progress_display(tty: bool | None = None) -> Iterator[None]:
    """Install a progress hook for the duration: rich bars (counts, elapsed, ETA) on a terminal, else
    ``LineProgress``. Both write to stderr, so stdout holds only the results."""
    from runtime import progress as prog

    tty = sys.stderr.isatty() if tty is None else tty
    if not tty:
        hook = LineProgress(every=float(os.environ.get("TURNTREE_PROGRESS_EVERY") or LINE_EVERY_S))
        stop = threading.Event()

        def ticker() -> None:
            while not stop.wait(1.0):
                hook.tick()

        prog.add_hook(hook)
        thread = threading.Thread(target=ticker, name="turntree-progress-lines", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            prog.remove_hook(hook)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as p:
        bars: dict[str, Any] = {}

        def hook(stage: str, done: int, total: int, message: str) -> None:
            if stage not in bars:
                bars[stage] = p.add_task(stage, total=total)
            p.update(bars[stage], completed=done, total=total, description=f"{stage} {message}"[:40])
            if total and done >= total:
                p.remove_task(bars.pop(stage))

        prog.add_hook(hook)
        try:
            yield
        finally:
            prog.remove_hook(hook)


# --- the run's story ----------------------------------------------------------------------------------------
_KEY = re.compile(r"^(?:iter-(\d+)/)?([a-z_]+)$")
TIMED = tuple(s for s in PIPELINE_STAGES if s != "data")  # the stages timed per iteration (data: once, quick)


def iteration_metrics(manifest: dict[str, Any]) -> dict[int, dict[str, float]]:
    """{iteration: metrics of its stages' current versions} (0: the warm start and the starting policy's
    evaluation; stages without an iteration, e.g. data, are left out)."""
    out: dict[int, dict[str, float]] = {}
    for key, rec in sorted(manifest.get("stages", {}).items()):
        m = _KEY.match(key)
        version = rec.get("versions", {}).get(rec.get("current") or "", {})
        if not m or m.group(1) is None or not version.get("output"):
            continue
        metrics = version["output"].get("metrics", {})
        it = out.setdefault(int(m.group(1)), {})
        it.update(metrics)
        it[f"seconds/{m.group(2)}"] = metrics.get(f"timing/{m.group(2)}", float("nan"))
    return out


def headline(metrics: dict[str, float]) -> dict[str, Any] | None:
    """The held-out score of one evaluation: math accuracy, else code pass@1 (first attempt), with its 95% CI
    and the number of problems; None without an evaluation."""
    benches = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") == 2})
    for bench in benches:
        for name, label in (("accuracy", "accuracy"), ("pass_at_1_attempt1", "pass@1")):
            key = f"eval/{bench}/{name}"
            if key in metrics:
                return {
                    "bench": bench,
                    "label": label,
                    "value": metrics[key],
                    "low": metrics.get(f"{key}_ci_low"),
                    "high": metrics.get(f"{key}_ci_high"),
                    "problems": int(metrics.get(f"eval/{bench}/problems", 0)),
                    "samples": int(metrics.get(f"eval/{bench}/samples_per_problem", 1)),
                }
    return None


def format_headline(h: dict[str, Any] | None, ci: bool = True) -> str:
    if h is None:
        return "-"
    text = f"{h['value']:.2f}"
    if h["samples"] == 1 and h["problems"]:
        text += f" ({round(h['value'] * h['problems'])}/{h['problems']})"
    if ci and h["low"] is not None and h["high"] is not None:
        text += f" [{h['low']:.2f}, {h['high']:.2f}]"
    return text


def _num(metrics: dict[str, float], *keys: str, fmt: str = "{:.3f}") -> str:
    for k in keys:
        v = metrics.get(k)
        if v is not None and v == v:
            return fmt.format(v)
    return "-"


def iteration_table(per_iter: dict[int, dict[str, float]]) -> list[str]:
    """One row per iteration: mean reward, fraction correct, tool calls per trajectory, held-out score with
    its 95% CI, and seconds per stage (0: warm start and the starting policy's evaluation)."""
    stages = [s for s in TIMED if any(f"seconds/{s}" in m for m in per_iter.values())]
    head = ["iter", "reward", "correct", "tool calls", "held-out (95% CI)", *[f"{s} s" for s in stages]]
    rows = []
    for k, m in sorted(per_iter.items()):
        rows.append(
            [
                str(k),
                _num(m, "reward/mean"),
                _num(m, "reward/correct_frac", "reward/pass_frac", fmt="{:.2f}"),
                _num(m, "rollout/tool_calls_per_trajectory", fmt="{:.2f}"),
                format_headline(headline(m)),
                *[_num(m, f"seconds/{s}", fmt="{:.1f}") for s in stages],
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(head), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def before_after(per_iter: dict[int, dict[str, float]], ci: bool = False) -> str | None:
    """'held-out accuracy on <bench> (N problems): 0.10 -> 0.25 (+0.15)' from the first and last evaluation
    (``ci``: each with its 95% CI)."""
    evals = [(k, headline(m)) for k, m in sorted(per_iter.items())]
    evals = [(k, h) for k, h in evals if h is not None]
    if len(evals) < 2 or evals[0][1]["bench"] != evals[-1][1]["bench"]:
        return None
    (k0, a), (k1, b) = evals[0], evals[-1]
    start = "starting policy" if k0 == 0 else f"iteration {k0}"
    return (
        f"held-out {a['label']} on {a['bench']} ({a['problems']} problems{', 95% CI' if ci else ''}): {start} "
        f"{format_headline(a, ci=ci)} -> iteration {k1} {format_headline(b, ci=ci)} ({b['value'] - a['value']:+.2f})"
    )


def prefect_ui() -> str:
    """The Prefect UI's base URL when a server outlives the command (PREFECT_API_URL), else ''."""
    return os.environ.get("PREFECT_API_URL", "").rstrip("/").removesuffix("/api")


def links(manifest: dict[str, Any], experiment_id: str | None, root: str) -> list[str]:
    """Where to look next. A Prefect link only when the flow ran on a server that outlives the command
    (PREFECT_API_URL); an MLflow link to the UI that `turntree serve` starts (or TURNTREE_MLFLOW_UI)."""
    out = []
    flow_run = manifest.get("prefect_flow_run_id")
    if flow_run and prefect_ui():
        out.append(f"Prefect: {prefect_ui()}/runs/flow-run/{flow_run}")
    elif flow_run:
        out.append(
            "Prefect: this run used a temporary server; to browse runs, start `turntree serve` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api before `turntree run`"
        )
    run = manifest.get("mlflow_run_id")
    if run and experiment_id:
        from flows.tracking import ui_base

        ui = ui_base()  # TURNTREE_MLFLOW_UI, or the tracking server the run logged to
        # the model-training view of the MLflow UI (its default is the GenAI traces view)
        url = f"{ui or 'http://127.0.0.1:5000'}/#/experiments/{experiment_id}/runs/{run}?workflowType=machine_learning"
        out.append(f"MLflow:  {url}" + ("" if ui else f"   (after `turntree serve --root {root}`)"))
    return out


def run_story(manifest: dict[str, Any], experiment_id: str | None, root: str) -> str:
    """The end of `turntree run`: the table per iteration, before -> after, the checkpoint and the links."""
    per_iter = iteration_metrics(manifest)
    lines = [
        f"run {manifest.get('run_id')}  ({manifest.get('params', {}).get('algorithm', '?')}, "
        f"{manifest.get('status', '?')})",
        "",
    ]
    lines += iteration_table(per_iter) + [""]
    ba = before_after(per_iter)
    if ba:
        lines.append(ba)
    if manifest.get("final_checkpoint"):
        lines.append(f"checkpoint: {manifest['final_checkpoint']}")
    if manifest.get("registered_model"):
        name, version = manifest["registered_model"].rsplit("/", 1)
        lines.append(f"MLflow model registry: {name} version {version}")
    return "\n".join(lines + links(manifest, experiment_id, root))


def runs_table(runs: list[dict[str, Any]]) -> str:
    """``turntree runs``: one line per run manifest (id, status, algorithm, iterations, reward, held-out)."""
    lines = [f"{'run id':<28} {'status':<12} {'algorithm':<9} {'iters':>5} {'reward':>7}  {'held-out':<14} created"]
    for m in runs:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created_at", 0)))
        algo = m.get("params", {}).get("algorithm", "-")
        iters, reward, held = run_summary_cells(m)
        lines.append(
            f"{m['run_id']:<28} {m.get('status', '?'):<12} {algo:<9} {iters:>5} {reward:>7}  {held:<14} {created}"
        )
    return "\n".join(lines)


def run_summary_cells(manifest: dict[str, Any]) -> tuple[str, str, str]:
    """(iterations done, last mean reward, last held-out score) for `turntree runs`."""
    per_iter = iteration_metrics(manifest)
    done = [k for k, m in per_iter.items() if k > 0 and "reward/mean" in m]
    reward = _num(per_iter[max(done)], "reward/mean") if done else "-"
    evals = [headline(m) for _, m in sorted(per_iter.items())]
    evals = [h for h in evals if h is not None]
    return str(len(done)), reward, format_headline(evals[-1], ci=False) if evals else "-"


# --- `turntree params` ----------------------------------------------------------------------------------------
def describe_params(model: Any, prefix: str = "") -> list[str]:
    """The resolved parameters as ``key: value  # description`` lines, sections nested by indentation."""
    import json

    from pydantic import BaseModel

    lines: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        desc = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{prefix}{name}:{desc}")
            lines += describe_params(value, prefix + "  ")
        else:
            shown = json.dumps(
                value.model_dump(mode="json") if hasattr(value, "model_dump") else value, default=str
            )
            lines.append(f"{prefix}{name}: {shown}{desc}")
    return lines


def stage_versions(store) -> str:
    """``turntree runs RUN``: one line per stage of the run, in pipeline order: its versions (the current one
    starred), the current version's rerun overrides, whether it is stale (made from a superseded version
    of an upstream stage's output), and which of its checkpoints lost their optimizer state (``turntree prune``)."""
    from flows.runstore import parse_key
    from stages import PIPELINE_STAGES

    manifest = store.load()
    stale = store.stale_stages()
    pruned: dict[tuple[str, str], set[str]] = {}
    for p in manifest.get("pruned", []):
        if p.get("done"):
            pruned.setdefault((p["stage"], p["version"]), set()).add(p.get("kind", "optimizer"))

    def order(key: str) -> tuple[int, int]:
        stage, it = parse_key(key)
        return (it or 0, PIPELINE_STAGES.index(stage) if stage in PIPELINE_STAGES else 99)

    lines = [
        f"run {manifest['run_id']} ({manifest.get('status', '?')})",
        f"{'stage':<22} {'versions':<16} notes",
    ]
    for key in sorted(manifest["stages"], key=order):
        entry = manifest["stages"][key]
        cur = entry.get("current")
        versions = " ".join(
            f"{v}*" if v == cur else v for v in sorted(entry["versions"], key=lambda v: int(v[1:]))
        )
        record = entry["versions"].get(cur, {})
        notes = []
        if record.get("overrides"):
            notes.append(f"rerun with {overrides_text(record['overrides'])}")
        if key in stale:
            notes.append(f"STALE: {stale[key]}")
        for kind, what in (("optimizer", "optimizer state"), ("weights", "weights")):
            if gone := [v for v in sorted(entry["versions"]) if kind in pruned.get((key, v), ())]:
                notes.append(f"{what} pruned: {' '.join(gone)}")
        lines.append(f"{key:<22} {versions:<16} {'; '.join(notes)}")
    return "\n".join(lines)


def overrides_text(overrides: dict) -> str:
    """``a.b=1, c="x"``: a rerun's (nested) overrides as dotted keys."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(flat(overrides).items()))
