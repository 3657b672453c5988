"""A process-wide progress hook, so long stages can report progress without importing prefect.

Stages call ``report(stage, done, total, message)``; the flow installs a hook that updates a Prefect progress
artifact, the CLI one that drives a rich progress bar. With no hook installed, reports go to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from runtime import watchdog

Hook = Callable[[str, int, int, str], None]
_hooks: list[Hook] = []
log = logging.getLogger("turntree.progress")


def report(stage: str, done: int, total: int, message: str = "") -> None:
    """Tell whoever listens that ``stage`` has done ``done`` of ``total`` units (and the run's watchdog that the
    run moves)."""
    watchdog.beat()
    if not _hooks:
        log.debug("%s: %d/%d %s", stage, done, total, message)
    for hook in list(_hooks):
        try:
            hook(stage, done, total, message)
        except Exception as e:  # a broken progress display must never break a stage
            log.warning("progress hook failed: %s", e)


def add_hook(hook: Hook) -> None:
    _hooks.append(hook)


def remove_hook(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)
