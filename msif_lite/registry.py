"""One registry type for every pluggable strategy (attribution methods, curvatures): a dict
from name to entry with `register` (the name must be new) and `lookup` (a clear error that
lists the valid names and the setting to change)."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """name → entry; entries carry their own `.name`."""

    def __init__(self, kind: str, setting: str):
        super().__init__()
        self.kind, self.setting = kind, setting

    def register(self, entry: T) -> T:
        """Add `entry` under `entry.name`; refuse a name already taken."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry called `name`, or a ValueError naming the setting and the valid names."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}: set {self.setting} to one of "
                             f"{list(self)}")  # fmt: skip
        return self[name]
