"""One registry helper for every name → implementation table (estimators, rewards, similarities, policy losses,
aggregations, KL estimators, normalisation scopes, return modes, engine backends).

    ESTIMATORS = Registry("advantage estimator")
    @ESTIMATORS.register("grpo")
    def _grpo(...): ...
    ESTIMATORS.lookup("grpo")       # unknown name: ValueError naming the valid entries

A name registered twice is an error (a silently replaced entry is a bug that only shows in results). Each
registry's names equal the ``Literal`` of the parameter that picks from it (tests/test_registries.py), so a
bad name in a config is refused by the parameter model before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, get_args

T = TypeVar("T")


class Registry(dict[str, T]):
    """A dict of named entries that refuses duplicates and names the valid entries on a miss."""

    def __init__(self, what: str, entries: Iterable[tuple[str, T]] = ()) -> None:
        super().__init__()
        self.what = what
        for name, value in entries:
            self[name] = value

    def __setitem__(self, name: str, value: T) -> None:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        super().__setitem__(name, value)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def deco(value: T) -> T:
            self[name] = value
            return value

        return deco

    def lookup(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; valid: {sorted(self)}")
        return self[name]


def literal_names(literal: Any) -> set[str]:
    """The names a ``Literal[...]`` type (possibly wrapped in Optional) allows."""
    return {a for a in get_args(literal) if isinstance(a, str)} or {
        x for arg in get_args(literal) for x in literal_names(arg)
    }
