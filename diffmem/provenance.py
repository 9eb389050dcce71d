"""Paths as a shipped results file or a shared report records them: never a machine's absolute path.

A results file under ``benchmarks/results/`` names the model by its hub id, or by its folder relative to the
repository (``diffmem/zoo/checkpoint_sd/pipeline``), beside the model's fingerprint; a file or folder outside
the repository is named by its last component only. :func:`portable` applies this to a whole record before a
benchmark writes it. A user's own ``provenance.json`` keeps the paths as typed (it is theirs); the HTML report
shows names (:func:`display_name`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
_WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")


def is_machine_path(value: Any) -> bool:
    """Whether ``value`` is a string that names an absolute file path (``/a/b``, ``~/a``, ``C:\\a``): one
    token, no spaces, with at least one component below the root."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        return False
    if value.startswith("~/"):
        return True
    if _WINDOWS_ABSOLUTE.match(value):
        return len(PureWindowsPath(value).parts) >= 2
    return value.startswith("/") and len(PurePosixPath(value).parts) >= 2


def display_name(path: str | Path) -> str:
    """The last component of a path (a model folder's or a file's name), for a page others will read."""
    text = str(path)
    pure = PureWindowsPath(text) if _WINDOWS_ABSOLUTE.match(text) else PurePosixPath(text)
    return pure.name or text


def portable_path(path: str | Path, root: str | Path | None = REPO_ROOT) -> str:
    """``path`` as a shipped results file records it: relative to ``root`` (POSIX separators) when it lies
    inside ``root``, else its name only (:func:`display_name`). A relative path or a hub id is returned as
    given."""
    text = str(path)
    if not is_machine_path(text):
        return text
    if root is not None and not _WINDOWS_ABSOLUTE.match(text):
        pure, base = PurePosixPath(text), PurePosixPath(str(Path(root)))
        if pure == base:
            return "."
        if base in pure.parents:
            return pure.relative_to(base).as_posix()
    return display_name(text)


def portable(record: Any, root: str | Path | None = REPO_ROOT) -> Any:
    """A copy of a JSON-able ``record`` (dicts, lists, strings, numbers) with every string that is an absolute
    path replaced by :func:`portable_path`; everything else is kept as it is."""
    if isinstance(record, dict):
        return {key: portable(value, root) for key, value in record.items()}
    if isinstance(record, (list, tuple)):
        return [portable(value, root) for value in record]
    if isinstance(record, Path):
        return portable_path(record, root) if record.is_absolute() else record.as_posix()
    return portable_path(record, root) if is_machine_path(record) else record


def machine_paths(record: Any, where: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` for every absolute path string in a JSON-able ``record``."""
    if isinstance(record, dict):
        return [hit for key, value in record.items() for hit in machine_paths(value, f"{where}.{key}")]
    if isinstance(record, (list, tuple)):
        return [hit for i, value in enumerate(record) for hit in machine_paths(value, f"{where}[{i}]")]
    return [(where or ".", record)] if is_machine_path(record) else []


def portable_json(record: Any, indent: int | None = 2, root: str | Path | None = REPO_ROOT) -> str:
    """``record`` as the JSON text of a shipped results file: :func:`portable` paths, other non-JSON values
    (numpy scalars, dataclass leftovers) as ``str``."""
    return json.dumps(portable(record, root), indent=indent, default=str)
