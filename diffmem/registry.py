"""One generic registry: how detectors, mitigators and attacks are added and found by name.

Modelled on lm-evaluation-harness: ``@REGISTRY.register("name", "alias")`` on a class, lazy
``"module:Object"`` entries so that heavy optional methods import only when used, and a ``KeyError``
that lists what is available.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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

    def create(self, name: str, **options: Any) -> T:
        """Instantiate ``name`` with dataclass options; unknown options raise a ``TypeError`` naming them."""
        cls = self.get(name)
        fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"{self.kind} {name!r} has no option(s) {unknown}; options: {sorted(fields)}")
        return cls(**options)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


class Configurable:
    """Mixin for dataclass methods: ``config()`` = name + public fields, for provenance files."""

    name: str = "component"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                                      if not f.name.startswith("_")}}
