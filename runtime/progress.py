"""A process-wide progress hook, so long stages can report progress without importing prefect.

Stages call ``report(stage, done, total, message)``; the flow installs a hook that updates a Prefect progress
artifact, the CLI one that drives a rich progress bar. With no hook installed, reports go to the log. The flow
also says when a stage begins and ends (``begin``/``end``), so a display can tell that a stage runs before its
first report; hooks that have ``begin``/``end`` methods hear those.
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


def begin(stage: str) -> None:
    """``stage`` starts running (hooks with a ``begin(stage)`` method hear it)."""
    _lifecycle("begin", stage)


def end(stage: str) -> None:
    """``stage`` stopped running, done or failed (hooks with an ``end(stage)`` method hear it)."""
    _lifecycle("end", stage)


def _lifecycle(event: str, stage: str) -> None:
    watchdog.beat()
    for hook in list(_hooks):
        fn = getattr(hook, event, None)
        if fn is None:
            continue
        try:
            fn(stage)
        except Exception as e:  # a broken progress display must never break a stage
            log.warning("progress hook failed: %s", e)


def add_hook(hook: Hook) -> None:
    _hooks.append(hook)


def remove_hook(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)
