"""The process's live engines (most recently used last): what the update stage pushes new weights into and
what the run store relabels when it moves a finished checkpoint into place. Importing this module never
imports a backend library, so callers can ask "is an engine live?" for free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

Engine = Any  # runtime.engines.base.Engine; not imported, so this registry sits below every backend

ENGINES: list[Engine] = []  # most recently used last


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
