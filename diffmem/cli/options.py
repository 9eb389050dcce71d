"""``--option`` parsing shared by scan (detectors), extract (attacks), mitigate and bench (methods)."""

from __future__ import annotations

import json
from typing import Any

from diffmem.errors import DiffmemError


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, null, lists), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise DiffmemError(f"option {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def parse_scoped_options(pairs: list[str] | None, scopes: list[str], what: str) -> dict[str, dict[str, Any]]:
    """``NAME.key=value`` pairs grouped by NAME, each NAME one of ``scopes`` (e.g. chosen attacks or methods)."""
    options: dict[str, dict[str, Any]] = {n: {} for n in scopes}
    for pair in pairs or []:
        scope, _, rest = pair.partition(".")
        if scope not in options or "=" not in rest:
            raise DiffmemError(f"option {pair!r} must be {what}.KEY=VALUE for one of {scopes}")
        options[scope] |= parse_options([rest])
    return options
