"""``diffmem extract``: extraction attacks on prompts, matched against a training set."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffmem.errors import DiffmemError

EXTRACT_WRITES = ("provenance.json", "parts", "extraction.parquet")


def add_extract_args(p: argparse.ArgumentParser) -> None:
    from diffmem.cli.options import add_force, positive_int

    p.add_argument("--prompts", default=None, help="prompt file (default: the zoo's captions)")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    p.add_argument("--train-index", default=None,
                   help="folder of training images to match against (default: the zoo's corpus)")
    p.add_argument("--attack", action="append", default=None,
                   help="attack name; repeat for several (default: one-step-whitebox, one-step-blackbox)")
    p.add_argument("--matcher", default="ssim", help="ssim | l2 | deepssim (default: ssim)")
    p.add_argument("--threshold", type=float, default=None, help="match threshold (default: per matcher / zoo)")
    p.add_argument("--out", default="runs/extract",
                   help="output folder; rerun the same command to resume (default: runs/extract)")
    add_force(p)
    p.add_argument("--limit", type=positive_int, default=None, help="attack only the first N prompts (default: all)")
    p.add_argument("--mitigation", default=None, metavar="FILE",
                   help="mitigation.json of an inference-time `diffmem mitigate`: attack the mitigated model "
                        "(default: none)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per chunk (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' generations (default: 0)")
    p.add_argument("--option", action="append", default=None, metavar="ATTACK.KEY=VALUE",
                   help="attack option, e.g. retrigger.lr=0.01 (repeatable; default: none)")


def run_extract_command(args: argparse.Namespace) -> None:
    from diffmem.attacks import make_attack
    from diffmem.cli.options import parse_scoped_options, resolve_device
    from diffmem.cli.scan_commands import first_n, with_mitigation
    from diffmem.extract import ExtractSettings, folder_training_index, run_extract
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.prompts import load_prompts
    from diffmem.tasks.zoo import zoo_own_items, zoo_training_index
    from diffmem.zoo.load import zoo_folder_for
    from diffmem.zoo.prompts import zoo_prompts

    # checked before the model loads; a failure writes nothing
    device = resolve_device(args.device)
    zoo = zoo_folder_for(args.model)  # the zoo being attacked, None for a user's checkpoint
    prompts = first_n(load_prompts(args.prompts, args.caption_column) if args.prompts else zoo_prompts(folder=zoo),
                      args.limit)
    check_output_dir(args.out, "extract", [args.model, args.prompts, args.train_index, args.mitigation], args.force,
                     writes=EXTRACT_WRITES)
    names = args.attack or ["one-step-whitebox", "one-step-blackbox"]
    options = parse_scoped_options(args.option, names, "ATTACK")
    try:
        attacks = [make_attack(n, **options[n]) for n in names]
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc
    mitigation = None
    if args.mitigation:
        from diffmem.mitigators.base import load_mitigation

        mitigation = load_mitigation(args.mitigation)
    if not args.train_index and zoo is None:
        raise DiffmemError(f"--model {args.model}: not a zoo, so there are no training images to match generations "
                           "against; pass --train-index FOLDER (the training images)")
    index = (folder_training_index(Path(args.train_index), args.matcher, args.threshold) if args.train_index
             else zoo_training_index(args.matcher, args.threshold, zoo=zoo))
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    if mitigation is not None:
        model = with_mitigation(model, mitigation)
    claim_output_dir(args.out, "extract", EXTRACT_WRITES)
    path = run_extract(model, prompts, attacks, index, args.out,
                       ExtractSettings(seed=args.seed, batch_size=args.batch_size, matcher=args.matcher,
                                       threshold=index.threshold), progress=not args.quiet,
                       own_items=None if args.prompts else zoo_own_items(prompts))
    table = pq.read_table(path)
    for attack in attacks:
        score = table.column(f"{attack.name}.score").to_numpy(zero_copy_only=False)
        line = f"{attack.name}: mean score {np.nanmean(score):.4f}"
        if f"{attack.name}.match_label" in table.column_names:
            labels = table.column(f"{attack.name}.match_label").to_pylist()
            line += ", " + ", ".join(f"{k} {labels.count(k)}" for k in ("matching_verbatim", "template_verbatim"))
        print(line)
    print(f"\nresults: {path}")
