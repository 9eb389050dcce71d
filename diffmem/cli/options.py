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


def parse_method_options(pairs: list[str] | None, method: str) -> dict[str, Any]:
    """Options of one method: ``KEY=VALUE`` or, as ``bench`` takes them, ``METHOD.KEY=VALUE`` (same format
    everywhere: an option scoped to another method is refused by name)."""
    out: list[str] = []
    for pair in pairs or []:
        key = pair.split("=", 1)[0]
        if "." in key:
            scope, _, rest = pair.partition(".")
            if scope != method:
                raise DiffmemError(f"option {pair!r} is scoped to {scope!r}, but the method is {method!r}")
            pair = rest
        out.append(pair)
    return parse_options(out)


def parse_scoped_options(pairs: list[str] | None, scopes: list[str], what: str) -> dict[str, dict[str, Any]]:
    """``NAME.key=value`` pairs grouped by NAME, each NAME one of ``scopes`` (e.g. chosen attacks or methods)."""
    options: dict[str, dict[str, Any]] = {n: {} for n in scopes}
    for pair in pairs or []:
        scope, _, rest = pair.partition(".")
        if scope not in options or "=" not in rest:
            raise DiffmemError(f"option {pair!r} must be {what}.KEY=VALUE for one of {scopes}")
        options[scope] |= parse_options([rest])
    return options


DEVICE_KINDS = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> str:
    """``--device`` checked once for every command: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    An unknown name (``gpu``) or a device this machine lacks (``cuda`` without a GPU, ``cuda:3`` with
    two) is refused with one line instead of running silently on the CPU or failing later in torch.
    """
    import torch

    kind, _, index = str(name).partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()) or (index and kind == "cpu"):
        raise DiffmemError(f"--device {name!r} is not a device name; expected cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DiffmemError(f"--device {name!r}: no CUDA GPU is available on this machine; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise DiffmemError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DiffmemError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    return name
