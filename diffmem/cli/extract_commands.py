"""``diffmem extract``: extraction attacks on prompts, matched against a training set."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffmem.errors import DiffmemError

EXTRACT_WRITES = ("provenance.json", "parts", "extraction.parquet", "null", "verdicts.parquet", "verdicts.json")


def add_extract_args(p: argparse.ArgumentParser) -> None:
    from diffmem.cli.options import add_force, add_verdict_options, positive_int

    p.add_argument("--prompts", default=None, help="prompt file (default: the zoo's captions)")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    p.add_argument("--train-index", default=None,
                   help="folder of training images to match against (default: the zoo's corpus)")
    p.add_argument("--attack", action="append", default=None,
                   help="attack name; repeat for several (default: replication with --null-prompts, else "
                        "one-step-whitebox, one-step-blackbox)")
    p.add_argument("--null-prompts", default=None, metavar="FILE",
                   help="prompts of the same kind that were NOT trained on (held-out captions): the null that "
                        "replication verdicts are decided against; runs the replication attack on both sets and "
                        "writes verdicts.parquet (default: the zoo's never-trained captions on a zoo, else none)")
    add_verdict_options(p)
    p.add_argument("--matcher", default="ssim", help="ssim | l2 | deepssim (default: ssim)")
    p.add_argument("--threshold", type=float, default=None, help="match threshold (default: per matcher / zoo)")
    p.add_argument("--out", default="runs/extract",
                   help="output folder; rerun the same command to resume (default: runs/extract)")
    add_force(p)
    p.add_argument("--limit", type=positive_int, default=None, help="attack only the first N prompts (default: all)")
    from diffmem.cli.scan_commands import add_mitigation_args

    add_mitigation_args(p, "attack the mitigated model")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per chunk (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' generations (default: 0)")
    p.add_argument("--option", action="append", default=None, metavar="ATTACK.KEY=VALUE",
                   help="attack option, e.g. retrigger.lr=0.01 (repeatable; default: none)")


def run_extract_command(args: argparse.Namespace) -> None:
    from diffmem.attacks import make_attack
    from diffmem.cli.options import parse_scoped_options, resolve_device
    from diffmem.cli.scan_commands import first_n, prepare_mitigation, with_mitigation
    from diffmem.extract import (
        NULL_FOLDER,
        REPLICATION,
        ExtractSettings,
        folder_training_index,
        own_items_of,
        run_extract,
    )
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
    check_output_dir(args.out, "extract", [args.model, args.prompts, args.train_index, args.mitigation,
                                           args.null_prompts], args.force, writes=EXTRACT_WRITES)
    if not 0 < args.fdr < 1:
        raise DiffmemError(f"--fdr must be between 0 and 1 (exclusive), got {args.fdr}")
    null_prompts = load_prompts(args.null_prompts, args.caption_column) if args.null_prompts else None
    if null_prompts is None and zoo is not None and not args.prompts and REPLICATION in (args.attack or []):
        from diffmem.zoo.prompts import zoo_null_prompts

        null_prompts = zoo_null_prompts(folder=zoo)
    names = args.attack or ([REPLICATION] if null_prompts is not None else ["one-step-whitebox", "one-step-blackbox"])
    if null_prompts is not None and REPLICATION not in names:
        names = [*names, REPLICATION]
    options = parse_scoped_options(args.option, names, "ATTACK")
    try:
        attacks = [make_attack(n, **options[n]) for n in names]
    except KeyError as exc:
        raise DiffmemError(str(exc).strip("'\"")) from exc
    except TypeError as exc:
        raise DiffmemError(str(exc)) from exc
    if null_prompts is not None:
        _check_null_size(null_prompts, next(a for a in attacks if a.name == REPLICATION).generations, args.null_level)
    from diffmem.models.loader import model_fingerprint

    mitigation = prepare_mitigation(args, model_fingerprint(args.model, args.config))  # refused before loading
    if not args.train_index and zoo is None:
        raise DiffmemError(f"--model {args.model}: not a zoo, so there are no training images to match generations "
                           "against; pass --train-index FOLDER (the training images)")
    index = (folder_training_index(Path(args.train_index), args.matcher, args.threshold) if args.train_index
             else zoo_training_index(args.matcher, args.threshold, zoo=zoo))
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    if mitigation is not None:
        model = with_mitigation(model, mitigation, accept_mismatch=args.accept_mitigation_mismatch)
    claim_output_dir(args.out, "extract", EXTRACT_WRITES)
    settings = ExtractSettings(seed=args.seed, batch_size=args.batch_size, matcher=args.matcher,
                               threshold=index.threshold)
    own = own_items_of(prompts) if args.prompts else zoo_own_items(prompts)
    path = run_extract(model, prompts, attacks, index, args.out, settings, progress=not args.quiet, own_items=own)
    table = pq.read_table(path)
    if null_prompts is not None:
        replication = next(a for a in attacks if a.name == REPLICATION)
        null_path = run_extract(model, null_prompts, [replication], index, Path(args.out) / NULL_FOLDER, settings,
                                progress=not args.quiet, own_items=[None] * len(null_prompts))
        _write_verdicts(args, table, pq.read_table(null_path), prompts, null_prompts, own)
    for attack in attacks:
        score = table.column(f"{attack.name}.score").to_numpy(zero_copy_only=False)
        line = f"{attack.name}: mean score {np.nanmean(score):.4f}"
        if f"{attack.name}.match_label" in table.column_names:
            labels = table.column(f"{attack.name}.match_label").to_pylist()
            kinds = ("matching_verbatim", "template_verbatim", "unattributed")
            line += ", " + ", ".join(f"{k} {labels.count(k)}" for k in kinds)
        print(line)
    print(f"\nresults: {path}")


def _write_verdicts(args: argparse.Namespace, table, null_table, prompts, null_prompts, own: list) -> None:
    """Decide and write the replication verdicts; print the count with its bound and the prompts."""
    import json

    from diffmem.extract import FAMILY_COLUMN, VERDICTS_FILE, VERDICTS_SUMMARY, VerdictSettings, replication_verdicts
    from diffmem.io import atomic_write_text
    from diffmem.jobs import write_parquet

    verdicts, summary = replication_verdicts(
        table, null_table, own, prompts.columns.get(FAMILY_COLUMN), null_prompts.columns.get(FAMILY_COLUMN),
        VerdictSettings(q=args.fdr, null_level=args.null_level))
    out = Path(args.out)
    summary["null_prompts"] = {"n": len(null_prompts), "source": null_prompts.source}
    write_parquet(verdicts, out / VERDICTS_FILE)
    atomic_write_text(out / VERDICTS_SUMMARY, json.dumps(summary, indent=2, default=str))
    print(f"\n{summary['sentence']}")
    for fam, null in summary["nulls"].items():
        print(f"  null {fam}: a generation matches above similarity {null['threshold']:.4g} "
              f"(rate {null['rate']:.4g} on {null['n']} never-trained generations)")
    rows = [r for r in verdicts.to_pylist() if r["replicates"]]
    rows.sort(key=lambda r: (r["q_value"], -r["replication_rate"]))
    if rows:
        print(f"replicating prompts (q-value, share of {summary['generations_per_prompt']} generations matching, "
              "whose image):")
        for r in rows[:20]:
            print(f"  q {r['q_value']:.2g}  {r['replication_rate']:.2f}  {r['attribution']:<7}  {r['text'][:80]}")
        if len(rows) > 20:
            print(f"  ... {len(rows) - 20} more in {out / VERDICTS_FILE}")
    print(f"verdicts: {out / VERDICTS_FILE} (summary: {out / VERDICTS_SUMMARY})")


def _check_null_size(null_prompts, generations: int, level: float) -> None:
    """Refuse, before any generation, a null too small for the per-generation level."""
    import math

    if not 0 < level < 1:
        raise DiffmemError(f"--null-level must be between 0 and 1 (exclusive), got {level}")
    need = math.ceil(1 / level - 1 - 1e-9)
    have = (len(null_prompts) - 1) * generations  # each null prompt is judged against the others (trimmed_null)
    if have < need:
        raise DiffmemError(f"--null-prompts '{null_prompts.source}': {len(null_prompts)} prompts x {generations} "
                           f"generations leave {max(have, 0)} null generations once one prompt is held out, expected "
                           f"at least {need} for --null-level {level:g} (at least {math.ceil(need / generations) + 1} "
                           "never-trained prompts, or raise --null-level)")
