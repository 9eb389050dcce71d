"""One generic registry: how detectors, mitigators and attacks are added and found by name.

Modelled on lm-evaluation-harness: ``@REGISTRY.register("name", "alias")`` on a class, lazy
``"module:Object"`` entries so that heavy optional methods import only when used, and a ``KeyError``
that lists what is available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class (or lazy ``"module:Object"`` string)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type[T] | str] = {}

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        if not names:
            raise ValueError(f"register a {self.kind} under at least one name")

        def decorate(cls: type[T]) -> type[T]:
            for name in names:
                self.add(name, cls)
            return cls

        return decorate

    def add(self, name: str, target: type[T] | str) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing is not target:
            raise ValueError(f"{self.kind} {name!r} is already registered to {existing}")
        self._entries[name] = target

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or 'none'}")
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
