"""``diffmem mitigate METHOD`` and ``diffmem bench``."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from diffmem.cli.listing import method_lines, methods
from diffmem.cli.options import (
    Parser,
    add_force,
    add_model_args,
    handled_by,
    parse_method_options,
    parse_options,
    parse_scoped_options,
    positive_int,
)
from diffmem.errors import DiffmemError


class MethodParser(Parser):
    """The parser of ``diffmem mitigate METHOD``: its ``--help`` ends with the method's options (``--option
    KEY=VALUE``), read from the method's class only when help is asked (it imports torch)."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + method_options(self.prog.split()[-1]) + "\n"


def method_options(name: str) -> str:
    """Every ``--option KEY=VALUE`` of mitigator ``name``: its dataclass fields with type and default."""
    import dataclasses

    from diffmem.mitigators import MITIGATORS

    cls = MITIGATORS.get(name)
    lines = [f"options of {name} (--option KEY=VALUE, values parsed as JSON):"]
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"  {f.name:<28}{kind} (default: {json.dumps(default, default=str)})")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem mitigate METHOD`` (one subcommand per method, so ``mitigate METHOD --help`` shows its options)
    and ``diffmem bench``."""
    listing = "\n".join(method_lines("MITIGATORS"))
    mitigate = sub.add_parser("mitigate", help="patch a checkpoint (or write an inference-time config)",
                              epilog=f"methods:\n{listing}", formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = mitigate.add_subparsers(dest="method", required=True, metavar="METHOD", parser_class=MethodParser)
    for m in methods("MITIGATORS"):
        add_mitigate_args(handled_by(msub.add_parser(m.name, aliases=list(m.aliases), help=m.summary,
                                                     description=m.summary),
                                     "diffmem.cli.mitigate_commands:run_mitigate"))
    register_bench(sub, listing)


def add_mitigate_args(p: argparse.ArgumentParser) -> None:
    """The options of ``diffmem mitigate METHOD`` (every method takes the same; its own go in ``--option``)."""
    add_model_args(p)
    p.add_argument("--prompts", default=None,
                   help="memorized prompts (default: a zoo model's memorized captions; required for any other model)")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    p.add_argument("--reference", default=None,
                   help="ordinary prompts (default: a zoo model's generic captions; required for any other model)")
    p.add_argument("--out", required=True,
                   help="new output folder: a patched checkpoint, or mitigation.json for inference-time "
                        "methods (re-applied by scan/extract/sample --mitigation); never the input")
    add_force(p)
    p.add_argument("--train-index", default=None, metavar="DIR",
                   help="training images adversarial-finetune's model-made surrogates must not match "
                        "(default: a zoo model's training images with its own captions, else the model's own "
                        "repeated generations)")
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="method option (listed by `diffmem mitigate METHOD --help`), values parsed as JSON when "
                        "they parse (repeatable; default: none)")


def register_bench(sub: argparse._SubParsersAction, listing: str) -> None:
    """``diffmem bench``."""
    bench = handled_by(sub.add_parser("bench", help="every mitigator on a task (a zoo model's own, default: the "
                                                    "default zoo's; or --memorized/--ordinary lists): memorization "
                                                    "removed vs quality kept, tuned on dev, reported on test",
                                      epilog=f"methods (--mitigators):\n{listing}",
                                      formatter_class=argparse.RawDescriptionHelpFormatter),
                       "diffmem.cli.mitigate_commands:run_bench_command")
    add_model_args(bench)
    bench.add_argument("--mitigators", nargs="+", default=None, help="methods, listed below (default: all)")
    bench.add_argument("--out", default="runs/bench", help="output folder; rerun to resume (default: runs/bench)")
    add_force(bench)
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                       help="split seeds: each cuts its own fit/dev/test splits; the table is the mean and spread "
                            "(default: 0 1)")
    bench.add_argument("--memorized", default=None, metavar="FILE",
                       help="memorized prompts of --model (with --ordinary: a folder task instead of the zoo; "
                            "default: none)")
    bench.add_argument("--ordinary", default=None, metavar="FILE", help="ordinary prompts of --model (default: none)")
    bench.add_argument("--train-index", default=None, metavar="DIR",
                       help="training images to match against (default: the original model's own generations of "
                            "the memorized prompts)")
    bench.add_argument("--clip-weights", default=None, metavar="FILE",
                       help="local open_clip weights for CLIP-score fidelity of a folder task (default: none)")
    bench.add_argument("--surrogates", choices=("model", "oracle"), default="model",
                       help="adversarial-finetune's surrogates: made from the model (default) or the zoo's "
                            "ground-truth renders ('oracle', an ablation)")
    bench.add_argument("--tune", action="append", default=None, metavar="METHOD.KEY=V1,V2",
                       help="candidate settings chosen on the dev split (repeatable; default: none)")
    bench.add_argument("--size", action="append", default=None, metavar="SPLIT=N",
                       help="split size, SPLIT in fit, dev, test, ordinary_fit, ordinary_dev, ordinary_test "
                            "(repeatable; default: 40, 24, 40, 128, 32, 64)")
    bench.add_argument("--samples", type=positive_int, default=3, help="generations per prompt (default: 3)")
    bench.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default: 25)")
    bench.add_argument("--attack-prompts", type=positive_int, default=16,
                       help="test prompts under each re-trigger attack, DoRI and the tuned one (default: 16)")
    bench.add_argument("--attack-steps", type=positive_int, default=30,
                       help="the tuned re-trigger's optimisation steps (default: 30; DoRI runs the paper's 50)")
    bench.add_argument("--option", action="append", default=None, metavar="METHOD.KEY=VALUE",
                       help="METHOD.KEY=VALUE for a mitigator, dori.KEY=VALUE for DoRI (the default re-trigger, "
                            "e.g. dori.starts=1) or retrigger.KEY=VALUE for the tuned re-trigger (e.g. "
                            "retrigger.lr=0.01; repeatable; default: none)")


def run_mitigate(args: argparse.Namespace) -> None:
    from diffmem.cli.options import resolve_device
    from diffmem.mitigators.base import MITIGATION_FILE, InferenceMitigator
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir
    from diffmem.prompts import load_prompts
    from diffmem.zoo.load import zoo_folder_for
    from diffmem.zoo.prompts import zoo_reference_prompts

    # everything checked before the model loads; nothing is written until the result is complete
    device = resolve_device(args.device)
    mitigator = _make(args)
    check_output_dir(args.out, mitigator.output_command, [args.model or _zoo_pipeline(), args.prompts, args.reference],
                     args.force, writes=[MITIGATION_FILE])
    zoo = zoo_folder_for(args.model)  # the zoo the model is (None: not a zoo, so no zoo defaults apply)
    if zoo is None and not _names_a_zoo(args.model):  # (an unbuilt zoo fails at load with how to build it)
        missing = [flag for flag, given in (("--prompts FILE", args.prompts), ("--reference FILE", args.reference))
                   if not given]
        if missing:
            raise DiffmemError(f"--model {args.model}: not a zoo, so there are no zoo captions to default to; pass "
                               f"{' and '.join(missing)} (memorized prompts, ordinary prompts of this model)")
    memorized_prompts = load_prompts(args.prompts, args.caption_column).texts if args.prompts else None
    ordinary_prompts = load_prompts(args.reference).texts if args.reference else None
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    if memorized_prompts is not None:
        memorized = memorized_prompts
    else:
        from diffmem.tasks.zoo import zoo_memorized_captions

        memorized = zoo_memorized_captions(zoo)
    ordinary = ordinary_prompts if ordinary_prompts is not None else zoo_reference_prompts(folder=zoo)
    if "index" in inspect.signature(mitigator.fit).parameters:
        # adversarial-finetune makes its surrogates from the model; a training index (if given) checks them
        index = None
        if getattr(args, "train_index", None):
            from diffmem.extract import folder_training_index

            index = folder_training_index(Path(args.train_index))
        elif not args.prompts:  # the zoo's own captions: its training images check the surrogates
            from diffmem.tasks.zoo import zoo_training_index

            index = zoo_training_index(zoo=zoo)
        mitigator.fit(model, memorized, ordinary, index=index)
    else:
        mitigator.fit(model, memorized, ordinary)
    out = mitigator.save(args.out, model, force=args.force)
    kind = "inference-time config" if isinstance(mitigator, InferenceMitigator) else "patched checkpoint"
    print(f"{mitigator.name}: {kind} written to {out}")
    summary = fit_summary(mitigator.describe_fit())
    if summary:
        print(f"fit: {summary} (in full: {Path(args.out) / MITIGATION_FILE})")
    if isinstance(mitigator, InferenceMitigator):
        model_arg = args.model or "zoo"
        print(f"it changes how prompts are encoded or sampled, not the weights: apply it with `diffmem scan|extract|"
              f"sample --model {model_arg} --mitigation {out}`")
    else:
        print(f"load it like any model: `diffmem scan --model {out}`")


def _make(args: argparse.Namespace):
    """The mitigator ``args.method`` with its ``--option`` values, or one line naming what is wrong."""
    from diffmem.mitigators import make_mitigator

    try:
        return make_mitigator(args.method, **parse_method_options(args.option, args.method))
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc


def fit_summary(fit: dict, limit: int = 6) -> str:
    """A short human line of a method's fit record (``describe_fit``): numbers and short strings as they are,
    lists and mappings by their size; at most ``limit`` entries (the file holds all of it)."""
    parts = []
    for key, value in fit.items():
        if value is None or value == {} or value == []:
            continue
        if isinstance(value, bool) or isinstance(value, (int, str)) and len(str(value)) <= 40:
            parts.append(f"{key} {value}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (list, tuple, dict)):
            parts.append(f"{key}: {len(value)} {'entries' if isinstance(value, dict) else 'items'}")
    return ", ".join(parts[:limit])


def _names_a_zoo(spec: str | None) -> bool:
    from diffmem.models.sources import ZOO_MODELS

    return spec is None or spec in ZOO_MODELS


def _zoo_pipeline(corpus: str | None = None):
    from diffmem.zoo.paths import zoo_pipeline_path

    return zoo_pipeline_path(corpus)


def run_bench_command(args: argparse.Namespace) -> None:
    from diffmem.bench import DEFAULT_METHODS, BenchSettings, run_bench
    from diffmem.cli.options import resolve_device
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.tasks import SplitSizes, make_task

    device = resolve_device(args.device)
    if bool(args.memorized) != bool(args.ordinary):
        raise DiffmemError("a folder task needs both --memorized FILE and --ordinary FILE (or neither: the zoo)")
    methods = args.mitigators or list(DEFAULT_METHODS)
    options = parse_scoped_options(args.option, [*methods, "retrigger", "dori"], "METHOD")
    tune = {k: {kk: _candidates(v) for kk, v in d.items()}
            for k, d in parse_scoped_options(args.tune, methods, "METHOD").items() if d}
    try:
        sizes = SplitSizes(**{k: int(v) for k, v in parse_options(args.size).items()})
        settings = BenchSettings(sizes=sizes, split_seeds=tuple(args.seeds), samples=args.samples, steps=args.steps,
                                 attack_prompts=args.attack_prompts, attack_steps=args.attack_steps,
                                 surrogates=args.surrogates, retrigger=options.pop("retrigger"),
                                 dori=options.pop("dori"),
                                 options={k: v for k, v in options.items() if v}, tune=tune)
    except (TypeError, ValueError) as exc:
        raise DiffmemError(f"bench settings: {exc}") from exc
    check_output_dir(args.out, "bench", [args.model or _zoo_pipeline(), args.memorized, args.ordinary,
                                         args.train_index], args.force, writes=["bench.json"])
    if args.memorized:
        task = make_task("folder", memorized=args.memorized, ordinary=args.ordinary, train_index=args.train_index,
                         clip_weights=args.clip_weights)
    else:  # a zoo model (default: the default zoo) brings its own task: captions, labels, fidelity
        from diffmem.tasks.zoo import zoo_task_for
        from diffmem.zoo.load import zoo_folder_for

        zoo = zoo_folder_for(args.model)
        if zoo is None:
            raise DiffmemError(f"model '{args.model}' is not a zoo, so bench needs its prompt lists: --memorized FILE "
                               "and --ordinary FILE")
        task = zoo_task_for(zoo)
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    claim_output_dir(args.out, "bench", ["bench.json"])
    record = run_bench(model, task, methods, args.out, settings)
    print(format_bench(record))
    print(f"\nresults: {Path(args.out) / 'bench.json'}")


def _candidates(value) -> list:
    """``--tune`` values: a JSON list, or comma-separated values each parsed as JSON when it parses."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        return [value]
    out = []
    for part in value.split(","):
        try:
            out.append(json.loads(part))
        except json.JSONDecodeError:
            out.append(part)
    return out


def format_bench(record: dict) -> str:
    """The test-split table: mean +- standard deviation over split seeds."""
    cols = ["extraction_rate", "matching_verbatim", "template_verbatim", "dori_extraction_rate",
            "tuned_retrigger_extraction_rate", "fidelity",
            "fidelity_memorized_all", "fid", "diversity", "fit_seconds", "parameters_changed"]
    widths = [max(17, len(c) + 2) for c in cols]  # every header in full
    head = f"{'method':<22}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    lines = [f"test split, mean +- sd over split seeds {list(record.get('runs', {}))}", head]
    from diffmem.bench_results import upgrade_result

    for name, r in record["results"].items():
        r = upgrade_result(r)  # files written before the re-trigger keys were renamed
        cells = []
        for c, w in zip(cols, widths):
            v, sd = r.get(c), r.get(f"{c}_std")
            cells.append(f"{'-':>{w}}" if v is None else f"{f'{v:.3g}+-{sd:.2g}' if sd else f'{v:.4g}':>{w}}")
        lines.append(f"{name:<22}" + "".join(cells))
    return "\n".join(lines)
