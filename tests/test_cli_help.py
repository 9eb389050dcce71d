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
    from diffmem.cli.listing import strip_rst
    from diffmem.detectors import DETECTORS
    from diffmem.mitigators import MITIGATORS

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


# ---------------------------------------------------------------- issue #32: what a user reads
def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_each_subcommand_lists_its_methods_and_a_method_its_options(capsys):
    from diffmem.mitigators import MITIGATORS

    text = _help(["mitigate"], capsys)
    assert "diffmem --help" not in text
    for name in ("adversarial-finetune", "embedding-noise", "nemo", "subspace-pruning"):
        first = MITIGATORS.get(name).__doc__.strip().splitlines()[0].replace("``", "")
        assert f"{name:<24}{first}" in text
    noise = _help(["mitigate", "embedding-noise"], capsys)
    assert "options of embedding-noise" in noise and "scale" in noise and "(default: 0.1)" in noise
    assert "surrogate_source" in _help(["mitigate", "dori-finetune"], capsys)  # an alias shows its method's options
    assert "lora_rank" in _help(["mitigate", "adversarial-finetune-lora"], capsys)
    assert "noise-norm" in _help(["scan"], capsys) and "one-step-whitebox" in _help(["extract"], capsys)
    assert "subspace-pruning" in _help(["bench"], capsys)


def test_help_text_has_no_rst_markup_and_calibrate_states_no_zoo_default(capsys):
    for path, _ in _leaves(build_parser()):
        assert "``" not in _help(list(path), capsys), path
    calibrate = _help(["calibrate"], capsys)
    assert "known to be ordinary" in calibrate and "the zoo's captions" not in calibrate
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--out", "x"])
    assert exc.value.code == 2 and "--prompts" in capsys.readouterr().err


def test_help_imports_no_torch_and_no_command_module_imports_main():
    import ast
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from diffmem.cli.main import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() in ("[]", "['numpy', 'pyarrow']"), done.stdout  # extract_commands: numpy, pyarrow
    assert "torch" not in done.stdout
    cli = Path(__file__).resolve().parents[1] / "diffmem" / "cli"
    for path in cli.glob("*.py"):
        if path.name in ("main.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "diffmem.cli.main", path.name


def test_listing_from_source_matches_the_registries():
    from diffmem.attacks import ATTACKS
    from diffmem.cli.listing import methods
    from diffmem.detectors import DETECTORS
    from diffmem.mitigators import MITIGATORS

    for key, registry in (("DETECTORS", DETECTORS), ("ATTACKS", ATTACKS), ("MITIGATORS", MITIGATORS)):
        listed = {n for m in methods(key) for n in (m.name, *m.aliases)}
        assert listed == set(registry.names()), key
        for m in methods(key):
            assert registry.get(m.name) is registry.get(m.aliases[0]) if m.aliases else True


def test_mitigate_prints_a_short_summary_and_the_real_model(tmp_path, tiny_sd_folder, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    common = ["--model", str(tiny_sd_folder), "--prompts", str(prompts), "--reference", str(prompts), "--quiet"]
    assert main(["mitigate", "subspace-pruning", *common, "--option", "timesteps=1", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "fit: pruned_weights: 4 entries, total_pruned" in out and "{" not in out
    assert main(["mitigate", "embedding-noise", *common, "--out", str(tmp_path / "n")]) == 0
    out = capsys.readouterr().out
    assert f"--model {tiny_sd_folder} --mitigation" in out and "<zoo>" not in out and "{}" not in out


def test_bench_table_shows_every_header_in_full():
    from diffmem.cli.mitigate_commands import format_bench

    record = {"runs": {"0": {}}, "results": {"nemo": {"retrigger_extraction_rate": 0.25, "fidelity": 0.9}}}
    head = format_bench(record).splitlines()[1]
    for col in ("dori_extraction_rate", "tuned_retrigger_extraction_rate", "fidelity_memorized_all",
                "parameters_changed"):
        assert col in head.split()
    row = format_bench(record).splitlines()[2].split()  # an earlier file's re-trigger is the tuned attack's
    assert row[0] == "nemo" and row[4] == "-" and row[5] == "0.25"
