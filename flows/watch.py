"""The watchdog around a run's writer (``runtime.watchdog``): where its stack dumps go, and when it is on."""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path

from runtime import watchdog


def dump_path(root: str, run_id: str) -> Path:
    """``<root>/<run_id>/logs/watchdog.txt`` for a local run root; under ``~/.cache/turntree/logs`` for a remote
    one (the stacks of a stuck process are written without any network call)."""
    if "://" in root and not root.startswith("file://"):
        key = hashlib.sha256(f"{root.rstrip('/')}/{run_id}".encode()).hexdigest()[:16]
        return Path.home() / ".cache" / "turntree" / "logs" / f"{run_id}-{key}" / "watchdog.txt"
    return Path(root.removeprefix("file://")) / run_id / "logs" / "watchdog.txt"


@contextmanager
def watched(root: str, run_id: str):
    """Watch this block (the main thread's run of a pipeline or a stage); re-entrant, and a no-op off the main
    thread, where signals cannot be handled."""
    if watchdog._active is not None or threading.current_thread() is not threading.main_thread():
        yield None
        return
    with watchdog.Watchdog(dump_path(root, run_id), watchdog.stall_timeout()) as w:
        yield w


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so a run unwinds like Ctrl-C: the temporary Prefect server and the workers it
    started are stopped (their atexit hooks run), the run is marked failed and its lock released."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_sigterm() -> None:
    """SIGTERM raises ``Terminated`` in the main thread (the watchdog ends the process when that cannot run)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
