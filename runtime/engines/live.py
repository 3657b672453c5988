"""The process's live engines (most recently used last): what the update stage pushes new weights into and
what the runner relabels (the run store's ``moved`` callback) when a finished checkpoint moves into place.
Importing this module never imports a backend library, so callers can ask "is an engine live?" for free.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Engine = Any  # runtime.engines.base.Engine; not imported, so this registry sits below every backend

ENGINES: list[Engine] = []  # most recently used last
# Held by whoever generates with the live engines (a rollout or an evaluation, for the whole stage) or changes
# them (an update pushing weights or freeing the KV cache): with the asynchronous pipeline a rollout runs in
# another thread while the update trains, and its weights must not change under it.
_IN_USE = threading.RLock()


@contextmanager
def exclusive(wait: bool = True):
    """Hold the live engines for this block; yields False (and holds nothing) when ``wait`` is False and
    another thread holds them."""
    if not _IN_USE.acquire(blocking=wait):
        yield False
        return
    try:
        yield True
    finally:
        _IN_USE.release()


def touch(engine: Engine) -> None:
    if engine in ENGINES:
        ENGINES.remove(engine)
    ENGINES.append(engine)


def forget(engine: Engine) -> None:
    if engine in ENGINES:
        ENGINES.remove(engine)


def relabel(old_prefix: str | os.PathLike, new_prefix: str | os.PathLike) -> int:
    """Engines whose weights came from under ``old_prefix`` now name ``new_prefix`` instead (the run store moves a
    finished stage's scratch dir into place after the update pushed its weights). Returns how many changed."""
    old, new = str(Path(old_prefix).resolve()), str(Path(new_prefix).resolve())
    n = 0
    for e in ENGINES:
        if e.loaded_from == old or e.loaded_from.startswith(old + os.sep):
            e.loaded_from = new + e.loaded_from[len(old) :]
            n += 1
    return n


def live_engine() -> Engine | None:
    """The most recently used engine of this process, or None."""
    return ENGINES[-1] if ENGINES else None


def close_all() -> None:
    for e in list(ENGINES):
        e.close()
