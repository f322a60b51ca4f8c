"""Name -> object registries. A mistyped name fails at once, listing the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cf.errors import CfError

T = TypeVar("T")


class UnknownNameError(CfError, KeyError):
    """A name that is not in a registry. The message lists the valid names and the closest ones."""

    def __init__(self, kind: str, name: str, valid: list[str], hint: str = ""):
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}; valid {kind} names: {', '.join(sorted(valid))}"
        if close:
            msg += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.kind, self.name, self.valid = kind, name, valid

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return self.args[0]


class Registry(Generic[T]):
    """A small typed dict with decorator registration and helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
