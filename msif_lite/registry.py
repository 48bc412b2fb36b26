"""One registry type for every pluggable strategy (attribution methods, curvatures, layer
kinds): a dict from name to entry with `register` (the name must be new) and `lookup` (a
clear error that lists the valid names and the setting to change).

`discover=("pkg.mod", "pkg.sub", …)`: on first read of the registry these modules are
imported in that order (a package: every module in it, sorted by name), so the entries they
register are there whatever was imported first, and no module imports the modules that
register into it (no import circle). A new curvature is one file in such a package."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """name → entry; entries carry their own `.name`."""

    def __init__(self, kind: str, setting: str, discover: tuple[str, ...] = ()):
        super().__init__()
        self.kind, self.setting, self.discover = kind, setting, tuple(discover)
        self._discovered = not self.discover

    def _load(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for name in self.discover:
            module = importlib.import_module(name)
            for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])),
                               key=lambda i: i.name):  # fmt: skip
                importlib.import_module(f"{name}.{info.name}")

    def register(self, entry: T) -> T:
        """Add `entry` under `entry.name`; refuse a name already taken."""
        name = entry.name  # type: ignore[attr-defined]
        if dict.__contains__(self, name):
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry called `name`, or a ValueError naming the setting and the valid names."""
        self._load()
        if not dict.__contains__(self, name):
            raise ValueError(f"unknown {self.kind} {name!r}: set {self.setting} to one of "
                             f"{list(self)}")  # fmt: skip
        return self[name]

    # every read of the registry sees the discovered entries
    def __iter__(self):
        self._load()
        return super().__iter__()

    def __getitem__(self, name: str) -> T:
        self._load()
        return super().__getitem__(name)

    def __contains__(self, name) -> bool:
        self._load()
        return super().__contains__(name)

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def items(self):
        self._load()
        return super().items()

    def keys(self):
        self._load()
        return super().keys()

    def values(self):
        self._load()
        return super().values()
