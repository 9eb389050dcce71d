"""``--help`` tells a new user what exists and what every option does (issue #15)."""

from __future__ import annotations

import argparse

import pytest

from diffmem.cli.main import build_parser, main


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


def test_top_level_help_lists_every_detector_attack_and_mitigator_with_a_line(capsys):
    from diffmem.attacks import ATTACKS
    from diffmem.detectors import DETECTORS
    from diffmem.mitigators import MITIGATORS

    from diffmem.cli.listing import strip_rst

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for title, registry in (("detectors", DETECTORS), ("attacks", ATTACKS), ("mitigators", MITIGATORS)):
        assert f"{title} (" in out
        for name in registry.names():
            cls = registry.get(name)
            first = strip_rst((cls.__doc__ or "").strip().splitlines()[0])
            assert name in out and first in out, (name, first)
    assert "``" not in out  # reStructuredText markup is for the API docs, not the terminal


def test_every_option_has_help_and_states_its_default():
    missing = []
    for path, parser in _leaves(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{' '.join(path)} {action.option_strings or action.dest}"
            if not action.help:
                missing.append(f"{where}: no help")
            elif action.option_strings and not action.required and action.default is not argparse.SUPPRESS \
                    and "default" not in action.help:
                missing.append(f"{where}: default {action.default!r} not stated")
    assert not missing, missing


def test_option_flags_use_one_format():
    for path, parser in _leaves(build_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in ("-h", "-v", "-q") or (flag.startswith("--") and flag == flag.lower()
                                                     and "_" not in flag), (path, flag)
        options = [a for a in parser._actions if "--option" in a.option_strings]
        for a in options:
            assert a.metavar and a.metavar.endswith("KEY=VALUE"), (path, a.metavar)


@pytest.mark.parametrize("argv", [["-v", "scan"], ["scan", "-v"], ["scan", "--verbose", "--quiet"],
                                  ["-q", "zoo", "info"], ["zoo", "info", "-q", "-v"]])
def test_verbose_and_quiet_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose == ("-v" in argv or "--verbose" in argv)
    assert args.quiet == ("-q" in argv or "--quiet" in argv)


def test_mitigate_options_take_the_bench_format_too(tmp_path, tiny_sd_folder):
    import json

    from diffmem.cli.options import parse_method_options
    from diffmem.errors import DiffmemError

    assert parse_method_options(["scale=2", "embedding-noise.seed=3"], "embedding-noise") == {"scale": 2, "seed": 3}
    with pytest.raises(DiffmemError, match="scoped to 'nemo'"):
        parse_method_options(["nemo.scale=2"], "embedding-noise")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    assert main(["mitigate", "embedding-noise", "--model", str(tiny_sd_folder), "--prompts", str(prompts),
                 "--reference", str(prompts), "--option", "embedding-noise.scale=0.5", "--out",
                 str(tmp_path / "m"), "--quiet"]) == 0
    assert json.loads((tmp_path / "m" / "mitigation.json").read_text())["mitigator"]["scale"] == 0.5
