"""A named registry: families, strategies (and later objectives) are entries in one, never branches."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Name -> entry, in registration order; a lookup of an unknown name raises ``error`` listing the known."""

    def __init__(self, kind: str, error: type[Exception]):
        super().__init__()
        self.kind, self.error = kind, error

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(self)}") from None
