"""What every command module shares, so none imports ``cli/main.py``: the argparse parser class and argument
types, the ``--model``/``--force`` arguments, ``--option`` parsing (detectors, attacks, methods) and
``--device`` checking. Light on purpose (no torch at import): ``diffmem --help`` builds every subcommand."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from diffmem.cli.listing import strip_rst
from diffmem.errors import DiffmemError

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``diffmem: error: ...``, exit 2), help without reStructuredText markup,
    and ``-v``/``--quiet`` accepted after the subcommand as well as before it."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"diffmem: error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def format_help(self) -> str:  # noqa: D102 - argparse API
        return strip_rst(super().format_help())

    def add_parser_common(self) -> None:
        """``-v`` and ``-q`` on a leaf subcommand."""
        # SUPPRESS: a subcommand's default never overrides the flag given before the subcommand
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="debug logging (default: off)")
        self.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                          help="no progress bars, weight-loading bars or library warnings (default: off)")


def _checked_number(parse: Callable[[str], Any], accept: Callable[[Any], bool], expected: str):
    """An argparse type: ``parse(text)`` kept when ``accept(value)``, else one line saying what was expected."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value:g}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


positive_int = _checked_number(int, lambda v: v >= 1, "a whole number >= 1")
positive_float = _checked_number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
non_negative_int = _checked_number(int, lambda v: v >= 0, "a whole number >= 0")
open_unit_float = _checked_number(float, lambda v: 0 < v < 1, "0 < value < 1 (a false-positive rate)")


def add_verdict_options(p: argparse.ArgumentParser, scope: str = "") -> None:
    """``--fdr`` and ``--null-level``: how replication verdicts are decided (:mod:`diffmem.eval.verdicts`), for
    every command that decides them (``extract``, ``zoo label``); ``scope`` prefixes their help."""
    p.add_argument("--fdr", type=open_unit_float, default=0.05,
                   help=f"{scope}false-discovery rate of the verdicts, Benjamini-Hochberg (default: 0.05)")
    p.add_argument("--null-level", type=open_unit_float, default=0.01,
                   help=f"{scope}per-generation tail level of the match threshold on the null generations "
                        "(default: 0.01)")


def add_force(p: argparse.ArgumentParser) -> None:
    """``--force`` of a command that writes a folder."""
    p.add_argument("--force", action="store_true",
                   help="write into an existing --out that holds other files; only diffmem's own files are "
                        "replaced, never yours (default: off)")


def add_file_force(p: argparse.ArgumentParser) -> None:
    """``--force`` of a command that writes one file: kept so earlier command lines still parse, but a file
    diffmem did not write is never replaced (an earlier output of the same command always is)."""
    p.add_argument("--force", action="store_true",
                   help="no effect: an earlier output of this command is replaced without it, and a file diffmem "
                        "did not write is never replaced (default: off)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--config``, ``--device`` and ``--dtype`` of every command that loads a model."""
    p.add_argument("--model", default=None,
                   help="zoo (the default zoo) | zoo:sd | zoo:collapse | a diffusers folder | a hub id org/name (read "
                        "from the Hugging Face cache; downloaded only when HF_HUB_OFFLINE=0) | one .safetensors file "
                        "(default: zoo)")
    p.add_argument("--config", default=None,
                   help="for a single .safetensors file: its family (sd1, sd2; their config files must be in the "
                        "Hugging Face cache offline) or a diffusers folder with its configs (default: inferred)")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:N or mps; refused when absent (default: cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE",
                   help=f"one of {', '.join(DTYPES[:3])} (default: float32 on CPU, else float16)")


def lazy_reexports(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that still serves names a command module used to import at its top (``name ->
    the module that defines it``), imported on first use, so the command module stays light for ``--help``."""

    def getattr_(name: str) -> Any:
        if name in moved:
            import importlib

            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return getattr_


def handled_by(p: argparse.ArgumentParser, handler: str) -> argparse.ArgumentParser:
    """Name the ``"module:function"`` that runs ``p``'s command (imported only when the command runs)."""
    p.set_defaults(handler=handler)
    return p


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
