"""``diffmem mitigate METHOD`` and ``diffmem bench``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.cli.options import parse_method_options, parse_scoped_options
from diffmem.errors import DiffmemError


def run_mitigate(args: argparse.Namespace) -> None:
    from diffmem.cli.options import resolve_device
    from diffmem.cli.scan_commands import zoo_reference_prompts
    from diffmem.mitigators import make_mitigator
    from diffmem.mitigators.base import MITIGATION_FILE, InferenceMitigator
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir
    from diffmem.prompts import load_prompts

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
    if memorized_prompts is not None:
        memorized = memorized_prompts
    else:
        from diffmem.zoo.load import load_labels
        from diffmem.zoo.paths import zoo_dir

        memorized = [r["caption"] for r in load_labels(zoo_dir()) if r["memorized"]
                     and r["kind"] in ("signature", "template")]
    ordinary = ordinary_prompts if ordinary_prompts is not None else zoo_reference_prompts()
    try:
        mitigator = make_mitigator(args.method, **parse_method_options(args.option, args.method))
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc
    if args.method == "adversarial-finetune":
        if args.prompts:
            raise DiffmemError("adversarial-finetune from the CLI needs surrogate images; run it on the zoo "
                               "(no --prompts) or through the Python API with surrogates=...")
        from diffmem.bench import surrogate_images
        from diffmem.zoo.load import load_labels
        from diffmem.zoo.paths import zoo_dir

        rows = {r["caption"]: r for r in load_labels(zoo_dir())}
        mitigator.fit(model, memorized, ordinary, surrogates=surrogate_images([rows[p] for p in memorized]))
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


def _zoo_pipeline():
    from diffmem.zoo.paths import zoo_pipeline_path

    return zoo_pipeline_path()


def run_bench_command(args: argparse.Namespace) -> None:
    from diffmem.bench import DEFAULT_METHODS, BenchSettings, run_bench
    from diffmem.cli.options import resolve_device
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir

    device = resolve_device(args.device)
    check_output_dir(args.out, "bench", [args.model or _zoo_pipeline()], args.force, writes=["bench.json"])
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    claim_output_dir(args.out, "bench", ["bench.json"])
    methods = args.mitigators or list(DEFAULT_METHODS)
    options = parse_scoped_options(args.option, [*methods, "retrigger"], "METHOD")
    settings = BenchSettings(seed=args.seed, retrigger=options.pop("retrigger"),
                             options={k: v for k, v in options.items() if v})
    record = run_bench(model, methods, args.out, settings)
    print(format_bench(record))
    print(f"\nresults: {Path(args.out) / 'bench.json'}")


def format_bench(record: dict) -> str:
    cols = ["extraction_rate", "matching_verbatim", "template_verbatim", "retrigger_extraction_rate", "fidelity",
            "fid", "diversity", "noise_norm_memorized", "fit_seconds", "parameters_changed"]
    head = f"{'method':<22}" + "".join(f"{c[:12]:>13}" for c in cols)
    lines = [head]
    for name, r in record["results"].items():
        lines.append(f"{name:<22}" + "".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]:>13}"
                                             for c in cols))
    return "\n".join(lines)
