"""The names and one-line descriptions of the registered detectors, attacks and mitigators, for ``--help``.

Read from the source files with :mod:`ast` instead of importing the registries: the built-in methods import
torch and diffusers, which would make every ``--help`` take seconds. A class is listed when it is decorated
``@DETECTORS.register("name", "alias")`` (or ``ATTACKS``, ``MITIGATORS``) in its package; its first docstring
line is the description, and its ``name = "..."`` class attribute (when among the registered names) is the main
name. ``tests/test_cli_help.py`` checks this listing against the imported registries.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGES = {"DETECTORS": "detectors", "ATTACKS": "attacks", "MITIGATORS": "mitigators"}
TITLES = {"DETECTORS": "detectors (--detector)", "ATTACKS": "attacks (--attack)",
          "MITIGATORS": "mitigators (mitigate METHOD, bench --mitigators)"}
_RST_LITERAL = re.compile(r"``(.+?)``")


def strip_rst(text: str) -> str:
    """``text`` with reStructuredText inline literals (double backticks) shown as plain words, as a terminal
    reader expects them (docstrings keep the markup for the API docs)."""
    return _RST_LITERAL.sub(r"\1", text)


@dataclass(frozen=True)
class Method:
    """One registered class: its main name, its aliases and the first line of its docstring."""

    name: str
    aliases: tuple[str, ...]
    summary: str


def _registered(node: ast.ClassDef, registry: str) -> list[str]:
    for deco in node.decorator_list:
        if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"
                and isinstance(deco.func.value, ast.Name) and deco.func.value.id == registry):
            return [a.value for a in deco.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return []


def _name_attribute(node: ast.ClassDef) -> str | None:
    for stmt in node.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id == "name" and isinstance(stmt.value, ast.Constant)):
            return str(stmt.value.value)
    return None


@cache
def methods(registry: str) -> tuple[Method, ...]:
    """Every class registered in ``registry`` (``DETECTORS``, ``ATTACKS`` or ``MITIGATORS``), sorted by name."""
    folder = Path(__file__).resolve().parent.parent / PACKAGES[registry]
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            names = _registered(node, registry)
            if not names:
                continue
            own = _name_attribute(node)
            main = own if own in names else names[0]
            doc = (ast.get_docstring(node) or "").strip().splitlines()
            found.append(Method(main, tuple(n for n in names if n != main), strip_rst(doc[0]) if doc else ""))
    return tuple(sorted(found, key=lambda m: m.name))


def method_lines(registry: str, indent: str = "  ") -> list[str]:
    """One line per method of ``registry``: name, description, aliases."""
    lines = []
    for m in methods(registry):
        alias = f" (alias {', '.join(m.aliases)})" if m.aliases else ""
        lines.append(f"{indent}{m.name:<24}{m.summary}{alias}")
    return lines


def registry_listing(registries: tuple[str, ...] = tuple(PACKAGES)) -> str:
    """The listing of each registry in ``registries`` under its title (the end of ``diffmem --help``)."""
    lines = []
    for registry in registries:
        lines += [f"{TITLES[registry]}:", *method_lines(registry)]
    return "\n".join(lines)
