"""What the model sees after a run: a short, capped text summary of a TestReport or an ExecutionResult."""

from __future__ import annotations

from runtime.sandbox.records import ExecutionResult, TestReport

MAX_FAILURES_SHOWN = 5
STREAM_HEAD, STREAM_TAIL = 300, 200


def clip(text: str, head: int, tail: int) -> str:
    """``text`` with its middle replaced by ``[... N characters truncated ...]`` when longer than head+tail."""
    if len(text) <= head + tail:
        return text
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters truncated ...]\n{text[len(text) - tail :]}"


def error_line(execution: ExecutionResult) -> str | None:
    """One line saying why the run ended badly, or None when it ended normally."""
    if execution.error:
        return f"Sandbox error: {execution.error}"
    if execution.timed_out:
        return f"Error: timed out after {execution.duration_s:.1f} s"
    if execution.memory_exceeded:
        return "Error: MemoryError (memory limit exceeded)"
    if execution.truncated:
        return "Error: output limit exceeded; the run was stopped"
    lines = [line for line in execution.stderr.strip().splitlines() if line.strip()]
    if execution.returncode not in (0, None) and lines:
        return f"Error: {lines[-1].strip()}"
    if execution.returncode not in (0, None):
        return f"Error: exited with status {execution.returncode}"
    return None


def _streams(execution: ExecutionResult) -> list[str]:
    parts = []
    for name in ("stdout", "stderr"):
        text = getattr(execution, name)
        if text.strip():
            marker = " (cut off at the output limit)" if execution.truncated else ""
            parts.append(f"{name}{marker}:\n{clip(text.rstrip(), STREAM_HEAD, STREAM_TAIL)}")
    return parts


def feedback_text(report: TestReport | ExecutionResult, max_chars: int = 1500) -> str:
    """Tests passed k/n, up to 5 failing tests (assert and returned value), the error line, and the head and
    tail of stdout/stderr; the whole text is clipped to ``max_chars`` with a truncation marker.

    An ExecutionResult (a plain tool call) gives the error line and the streams only.
    """
    if max_chars < 100:
        raise ValueError(f"feedback_text max_chars must be at least 100, got {max_chars}")
    execution = report if isinstance(report, ExecutionResult) else report.execution
    parts = []
    if isinstance(report, TestReport):
        parts.append(f"Tests passed: {report.passed}/{report.total}")
        if report.tampered:
            parts.append("The run wrote forged records to the result channel: all tests count as failed.")
        failures = [r for r in report.results if not r.passed]
        for r in failures[:MAX_FAILURES_SHOWN]:
            parts.append(f"Failed: {clip(r.test.strip(), 200, 60)}\n  {clip(r.message, 300, 100)}")
        if len(failures) > MAX_FAILURES_SHOWN:
            parts.append(f"... and {len(failures) - MAX_FAILURES_SHOWN} more failing tests")
    if execution is not None:
        line = error_line(execution)
        if line:
            parts.append(line)
        parts += _streams(execution)
    if isinstance(report, ExecutionResult) and len(parts) == 0:
        parts.append("(no output)")
    text = "\n".join(parts)
    if len(text) <= max_chars:
        return text
    marker_room = 60
    head = (max_chars - marker_room) * 2 // 3
    return clip(text, head, max_chars - marker_room - head)
