"""``diffmem mitigate METHOD`` and ``diffmem bench``."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from diffmem.cli.options import parse_method_options, parse_options, parse_scoped_options
from diffmem.errors import DiffmemError


def run_mitigate(args: argparse.Namespace) -> None:
    from diffmem.cli.options import resolve_device
    from diffmem.mitigators import make_mitigator
    from diffmem.mitigators.base import MITIGATION_FILE, InferenceMitigator
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir
    from diffmem.prompts import load_prompts
    from diffmem.zoo.prompts import zoo_reference_prompts

    # everything checked before the model loads; nothing is written until the result is complete
    device = resolve_device(args.device)
    check_output_dir(args.out, "mitigate", [args.model or _zoo_pipeline(), args.prompts, args.reference],
                     args.force, writes=[MITIGATION_FILE])
    try:
        make_mitigator(args.method, **parse_method_options(args.option, args.method))
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc
    memorized_prompts = load_prompts(args.prompts, args.caption_column).texts if args.prompts else None
    ordinary_prompts = load_prompts(args.reference).texts if args.reference else None
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    from diffmem.zoo.load import zoo_folder_of

    zoo = zoo_folder_of(model)  # the zoo the model came from (None: not a zoo; zoo defaults below use the default)
    if memorized_prompts is not None:
        memorized = memorized_prompts
    else:
        from diffmem.tasks.zoo import zoo_memorized_captions

        memorized = zoo_memorized_captions(zoo)
    ordinary = ordinary_prompts if ordinary_prompts is not None else zoo_reference_prompts(folder=zoo)
    try:
        mitigator = make_mitigator(args.method, **parse_method_options(args.option, args.method))
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc
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
    print(f"{args.method}: {kind} written to {out}")
    if isinstance(mitigator, InferenceMitigator):
        print(f"it changes how prompts are encoded or sampled, not the weights: apply it with `diffmem scan|extract|"
              f"sample --model {args.model or '<zoo>'} --mitigation {out}`")
    else:
        print(f"load it like any model: `diffmem scan --model {out}`")
    print(json.dumps({k: v for k, v in mitigator.describe_fit().items() if k != "neurons"}, default=str)[:2000])


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
    options = parse_scoped_options(args.option, [*methods, "retrigger"], "METHOD")
    tune = {k: {kk: _candidates(v) for kk, v in d.items()}
            for k, d in parse_scoped_options(args.tune, methods, "METHOD").items() if d}
    try:
        sizes = SplitSizes(**{k: int(v) for k, v in parse_options(args.size).items()})
        settings = BenchSettings(sizes=sizes, split_seeds=tuple(args.seeds), samples=args.samples, steps=args.steps,
                                 attack_prompts=args.attack_prompts, attack_steps=args.attack_steps,
                                 surrogates=args.surrogates, retrigger=options.pop("retrigger"),
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
    cols = ["extraction_rate", "matching_verbatim", "template_verbatim", "retrigger_extraction_rate", "fidelity",
            "fidelity_memorized_all", "fid", "diversity", "fit_seconds", "parameters_changed"]
    head = f"{'method':<22}" + "".join(f"{c[:14]:>17}" for c in cols)
    lines = [f"test split, mean +- sd over split seeds {list(record.get('runs', {}))}", head]
    for name, r in record["results"].items():
        cells = []
        for c in cols:
            v, sd = r.get(c), r.get(f"{c}_std")
            cells.append(f"{'-':>17}" if v is None else f"{f'{v:.3g}+-{sd:.2g}' if sd else f'{v:.4g}':>17}")
        lines.append(f"{name:<22}" + "".join(cells))
    return "\n".join(lines)
