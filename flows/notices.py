"""Pipeline warnings where a user of the Prefect UI looks: the flow run's (or task run's) logs, and a list the
run's summary artifact shows.

turntree's stages log with the standard ``logging`` module under ``turntree.*`` (they import no Prefect); the
pipeline flow installs ``Notices`` on the ``turntree`` logger for its duration, which copies each WARNING or
worse to Prefect's run logger of the flow or task run it happens in (so it shows in that run's logs, with its
level) and keeps the messages for the summary.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

ROOT = "turntree"


class Notices(logging.Handler):
    """Copies WARNING+ records of ``turntree.*`` to the current Prefect run's logger and remembers them."""

    def __init__(self, keep: int = 100) -> None:
        super().__init__(logging.WARNING)
        self.keep = keep
        self.messages: list[str] = []
        self._local = (
            threading.local()
        )  # re-entrance guard (a Prefect logger that logs back through turntree)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            text = record.getMessage()
            if len(self.messages) < self.keep:
                self.messages.append(f"{record.levelname}: {text}")
            with contextlib.suppress(MissingContextError):  # a thread of our own: no run to log to
                get_run_logger().log(record.levelno, "%s (%s)", text, record.name)
        except Exception:  # a notice must never break a stage
            self.handleError(record)
        finally:
            self._local.busy = False


@contextlib.contextmanager
def notices() -> Iterator[Notices]:
    """``Notices`` on the ``turntree`` logger for the duration (warnings also reach Prefect's run logs)."""
    logger = logging.getLogger(ROOT)
    handler = Notices()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
