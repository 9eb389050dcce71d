"""The ``diffmem`` command line: ``demo``, ``scan``, ``calibrate``, ``eval detect``, ``sample``, ``extract``,
``mitigate``, ``finetune``, ``bench``, ``report``, ``deepssim train`` and
``zoo build|estimate|label|info|check-corpus``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from diffmem.cli.listing import method_lines, registry_listing
from diffmem.cli.options import Parser, add_model_args, handled_by
from diffmem.errors import DiffmemError

# the modules whose register(sub) adds their subcommands, in the order --help lists them
COMMAND_MODULES = ("demo", "scan_commands", "sample_commands", "extract", "mitigate_commands", "finetune_commands",
                   "report_commands", "deepssim_commands", "zoo_commands")


class ListingHelp(Parser):
    """The top-level parser: its ``--help`` ends with every detector, attack and mitigator."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + registry_listing() + "\n"


def _register_extract(sub: argparse._SubParsersAction) -> None:
    from diffmem.cli.extract_commands import add_extract_args

    extract = handled_by(sub.add_parser("extract", help="run extraction attacks and match generations to training "
                                                        "data", formatter_class=argparse.RawDescriptionHelpFormatter,
                                        epilog="attacks (--attack):\n" + "\n".join(method_lines("ATTACKS"))),
                         "diffmem.cli.extract_commands:run_extract_command")
    add_model_args(extract)
    add_extract_args(extract)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, each registered by its own module (``register(sub)``)."""
    parser = ListingHelp(prog="diffmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, weight-loading bars or library warnings (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        if name == "extract":  # extract_commands.py exports add_extract_args (its options) only
            _register_extract(sub)
        else:
            importlib.import_module(f"diffmem.cli.{name}").register(sub)
    _add_common_to_leaves(sub)
    return parser


def _add_common_to_leaves(action: argparse._SubParsersAction) -> None:
    """``-v`` and ``--quiet`` on every leaf subcommand (``diffmem scan -v`` as well as ``diffmem -v scan``)."""
    for p in dict.fromkeys(action.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_common_to_leaves(nested[0])
        elif isinstance(p, Parser):
            p.add_parser_common()


def quiet_libraries(verbose: bool = False, quiet: bool = False) -> None:
    """Keep transformers/diffusers/huggingface_hub to errors only (their warnings are not the user's
    business on every command); ``quiet`` also hides weight-loading and progress bars. ``-v`` keeps all."""
    if verbose:
        return
    import warnings

    for name in ("transformers", "diffusers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|diffusers|huggingface_hub|torch)")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        try:
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            dlog.disable_progress_bar()
            tlog.disable_progress_bar()
        except ImportError:  # pragma: no cover - both are dependencies
            pass


class Terminated(BaseException):
    """SIGTERM arrived: raised in the main thread so every ``finally`` and staging cleanup runs (a killed build
    leaves no hidden ``.NAME.*.partial`` folder), then reported as exit status 143."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` instead of killing the process outright (only in
    the main thread, where Python delivers signals); the previous handler is restored afterwards."""
    def handler(signum, frame):  # noqa: ARG001 - signal API
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="diffmem: %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries(verbose=args.verbose, quiet=args.quiet)
    module, _, name = args.handler.partition(":")
    try:
        with sigterm_raises():
            getattr(importlib.import_module(module), name)(args)
    except DiffmemError as exc:
        print(f"diffmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Terminated:
        print("diffmem: terminated (SIGTERM); partial outputs were removed, rerun the same command to resume",
              file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
