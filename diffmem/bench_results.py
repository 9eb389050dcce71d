"""The names of ``diffmem bench`` result figures, and how files written before a rename are read back.

Kept apart from :mod:`diffmem.bench` so that readers of bench files (``diffmem report``,
``benchmarks/tables.py``) need not import the models and attacks.
"""

from __future__ import annotations

from typing import Any

REATTACKS = (("dori", "dori_extraction_rate"), ("retrigger", "tuned_retrigger_extraction_rate"))
"""The adaptive attacks every bench result reports: (attack name, result key); the first is the default."""
LEGACY_KEYS = {"retrigger_extraction_rate": "tuned_retrigger_extraction_rate"}
"""Result keys of earlier bench files and what they are called now (the tuned attack was the only re-trigger)."""


def upgrade_result(row: dict[str, Any]) -> dict[str, Any]:
    """A bench result row with earlier key names mapped to the current ones (the row itself is unchanged)."""
    out = dict(row)
    for old, new in LEGACY_KEYS.items():
        for suffix in ("", "_std"):
            if old + suffix in out and new + suffix not in out:
                out[new + suffix] = out.pop(old + suffix)
    return out


def reattack_rate(row: dict[str, Any]) -> float:
    """The re-trigger figure the tuning rule and summaries use: DoRI's when measured, else the tuned attack's."""
    row = upgrade_result(row)
    for _, key in REATTACKS:
        if row.get(key) is not None:
            return float(row[key])
    raise KeyError("the result holds no re-trigger figure")
