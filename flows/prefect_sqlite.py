"""The Prefect server `turntree serve` starts, run as ``python -m flows.prefect_sqlite server start ...``: Prefect's
own CLI, with every SQLite write transaction begun IMMEDIATE.

Why: Prefect 3.7 begins its SQLite transactions DEFERRED. A transaction that reads (the deployment) and then writes
(the new flow run) fails at once with "database is locked" when another connection wrote in between, because
SQLite cannot upgrade a stale read snapshot, and no busy timeout helps. A worker's polls write every few seconds,
so the Prefect UI's Run → Quick run could be answered 503 ("Oops. Something went wrong"): about 5% of run
creations with two workers polling every second (Prefect issues #23051 and #10188). The UI does not retry; Prefect's Python client
does, which is why only the UI showed it. BEGIN IMMEDIATE takes the write lock first and waits its turn (busy
timeout 60 s), so transactions queue instead of failing. Reads outside a transaction are untouched. With a
PostgreSQL database (``PREFECT_API_DATABASE_CONNECTION_URL``) nothing changes: only the SQLite configuration is
patched. If a Prefect release renames what is patched, the server starts unpatched and says so.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager


def begin_sqlite_writes_immediately() -> bool:
    """Patch Prefect's SQLite configuration so that ``session_context(begin_transaction=True)`` begins
    IMMEDIATE; True when patched.

    Prefect picks the BEGIN of every SQLite session from a context variable that a transaction sets for its whole
    body, so a plain session opened inside one (``begin_transaction=False``: Prefect means no BEGIN; e.g. the work
    queue status event read inside the pause/resume update) inherits it. Unpatched that inner session began
    DEFERRED and read; begun IMMEDIATE it would wait on its own caller's lock. So a plain session's body runs with
    no BEGIN mode, as Prefect intends."""
    try:
        from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
        from prefect.server.database.interface import PrefectDBInterface
    except ImportError:
        return False
    deferred_or_immediate = getattr(AioSqliteConfiguration, "begin_transaction", None)
    plain_or_transaction = getattr(PrefectDBInterface, "session_context", None)
    if deferred_or_immediate is None or plain_or_transaction is None:
        return False
    if getattr(deferred_or_immediate, "_turntree_immediate", False):
        return True

    @asynccontextmanager
    async def begin_transaction(self, session, with_for_update: bool = False):
        async with deferred_or_immediate(self, session, with_for_update=True) as transaction:
            yield transaction

    @asynccontextmanager
    async def session_context(self, begin_transaction: bool = False, with_for_update: bool = False):
        token = None if begin_transaction else SQLITE_BEGIN_MODE.set(None)
        try:
            async with plain_or_transaction(self, begin_transaction, with_for_update) as session:
                yield session
        finally:
            if token is not None:
                SQLITE_BEGIN_MODE.reset(token)

    begin_transaction._turntree_immediate = True
    AioSqliteConfiguration.begin_transaction = begin_transaction
    PrefectDBInterface.session_context = session_context
    return True


def main() -> int:
    if not begin_sqlite_writes_immediately():
        print(
            "turntree: warning: Prefect's SQLite transactions could not be patched; UI actions may be answered "
            "503 under load",
            file=sys.stderr,
        )
    from prefect.cli import app

    sys.argv[0] = "prefect"
    return app()


if __name__ == "__main__":
    sys.exit(main())
