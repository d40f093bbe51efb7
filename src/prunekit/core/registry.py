"""The one registry mechanism: structures, scores, algorithms, models, data sets and tasks are each a
:class:`Registry`, filled next to their definitions with ``@REGISTRY.register("name")``.

A miss raises :class:`~prunekit.core.errors.UnknownNameError` listing the valid names, the same way for
every kind, so a recipe typo and an API typo read alike.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prunekit.core.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → objects of one kind (``kind`` is used in messages: "unknown algorithm 'x'; valid: …")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        for a in aliases:
            self._aliases[a] = name
        return obj

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(obj: T) -> T:
            return self.add(name, obj, aliases=aliases)
        return deco

    def canonical(self, name: str) -> str:
        key = self._aliases.get(name, name)
        if key not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
