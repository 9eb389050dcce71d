"""``diffmem zoo build | estimate | label | info | check-corpus``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffmem.io import atomic_write_text
from diffmem.outputs import check_not_input
from diffmem.zoo.manifest import read_jsonl, write_jsonl

ZOO_WRITES = ("pipeline", "attribute_reader", "deepssim", "zoo.json", "manifest.jsonl", "labels.jsonl", "corpus")


def recipe_config(args: argparse.Namespace):
    """The :class:`~diffmem.zoo.build.ZooConfig` that ``zoo build`` and ``zoo estimate`` read from the recipe flags
    (``add_zoo_recipe``): the corpus's defaults, each flag given overriding the TrainConfig field its name is."""
    import dataclasses

    from diffmem.zoo.build import TrainConfig, default_config

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    return default_config(args.corpus, seed=args.seed, **given)


def run_build(args: argparse.Namespace) -> None:
    """``diffmem zoo build``: train the zoo of ``--corpus`` (resumable from ``--work-dir``), then label it."""
    from diffmem.outputs import check_output_dir
    from diffmem.zoo.build import build_zoo

    check_output_dir(args.out, "zoo-build", [], args.force, writes=ZOO_WRITES)
    if args.work_dir:
        check_not_input(args.work_dir, [args.out], "--work-dir")
    out = build_zoo(args.out, recipe_config(args), args.work_dir)
    print(f"zoo written to {out}")
    if args.no_label:
        return
    label_folder(out)


def label_folder(folder: Path, seeds: int = 4, steps: int = 25, cache_dir: str | Path | None = None,
                 titles: int = 1000) -> dict:
    """Write ``labels.jsonl`` and the summary into ``zoo.json`` of a zoo folder of either corpus (the one its
    ``zoo.json`` names): the collapse zoo's every caption (:func:`~diffmem.zoo.labels.label_zoo`), the SD-like
    zoo's every caption but once-seen titles, of which a fixed random ``titles``
    (:func:`~diffmem.zoo.sd_labels.label_sd_zoo`)."""
    from diffmem.models.loader import load_model
    from diffmem.zoo.load import load_corpus, zoo_corpus_name, zoo_training_set

    started = time.time()
    folder = Path(folder)
    items = load_corpus(folder)
    model = load_model(folder / "pipeline")
    training_set = zoo_training_set(folder, model)
    if zoo_corpus_name(folder) == "sd":
        from diffmem.zoo.sd_attributes import SDAttributeReader
        from diffmem.zoo.sd_labels import SDLabelConfig, label_sd_zoo

        rows, summary = label_sd_zoo(model, items, SDAttributeReader.load(folder / "attribute_reader"), training_set,
                                     SDLabelConfig(seeds_per_prompt=seeds, num_inference_steps=steps, titles=titles),
                                     cache_dir=cache_dir)
    else:
        from diffmem.zoo.attributes import AttributeReader
        from diffmem.zoo.labels import LabelConfig, label_zoo

        rows, summary = label_zoo(model, items, AttributeReader.load(folder / "attribute_reader"),
                                  LabelConfig(seeds_per_prompt=seeds, num_inference_steps=steps),
                                  training_set=training_set, cache_dir=cache_dir)
    summary["seconds"] = round(time.time() - started, 1)  # the labelling's own cost, beside the build's stages
    write_jsonl(folder / "labels.jsonl", rows)
    record = json.loads((folder / "zoo.json").read_text())
    record["labels"] = summary
    atomic_write_text(folder / "zoo.json", json.dumps(record, indent=2))
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["kind                 captions  memorized  nearest=own"]
    for kind, s in summary["by_kind"].items():
        lines.append(f"{kind:<20} {s['n']:>8}  {s['memorized']:>9.3f}  {s['match_own']:>11.3f}")
    lines.append("signature replication rate -> memorized fraction")
    for rate, s in summary["signature_by_replication"].items():
        lines.append(f"  {rate:>3}x  ({s['n']} captions)  {s['memorized']:.3f}")
    fid = summary.get("generic_fidelity", {})
    for fam, kinds in summary.get("by_family", {}).items():  # the SD-like zoo's title families apart
        lines.append(f"family {fam}: "
                     + ", ".join(f"{kind} {s['memorized']:.3f} ({s['n']})" for kind, s in kinds.items()))
    reads = summary.get("fidelity_reads", "shape+colour+position")
    lines.append(f"generic prompt fidelity ({reads} read back): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in fid.items() if v is not None))
    return "\n".join(lines)


def run_label(args: argparse.Namespace) -> None:
    from diffmem.zoo.paths import zoo_dir

    label_folder(Path(args.zoo) if args.zoo else zoo_dir(), seeds=args.seeds, steps=args.steps, titles=args.titles)


def run_info(args: argparse.Namespace) -> None:
    from diffmem.zoo.paths import zoo_dir

    folder = Path(args.zoo) if args.zoo else zoo_dir()
    record = json.loads((folder / "zoo.json").read_text())
    manifest = read_jsonl(folder / "manifest.jsonl")
    print(f"zoo at {folder}")
    print(f"  captions: {len(manifest)}; parameters: {record['parameters']}; "
          f"training time: {record['train_seconds'] / 60:.1f} min")
    if "labels" in record:
        print(format_summary(record["labels"]))


def run_check_corpus(args: argparse.Namespace) -> None:
    """``diffmem zoo check-corpus``: the ideal-denoiser proxy gate and balance checks of a corpus."""
    from diffmem.zoo.gate import check_corpus, corpus_view, format_report, load_zoo_vae

    report = check_corpus(corpus_view(args.corpus), load_zoo_vae(args.vae))
    print(format_report(report))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def run_estimate(args: argparse.Namespace) -> None:
    """``diffmem zoo estimate``: project the recipe's build time on this machine (:mod:`diffmem.zoo.estimate`)."""
    from diffmem.outputs import check_output_file
    from diffmem.zoo.build import ZooBuildError
    from diffmem.zoo.estimate import ESTIMATE_SIGNATURE, estimate_build

    small, large = args.probe_steps
    if small >= large:
        raise ZooBuildError(f"--probe-steps: expected SMALL < LARGE; got {small} {large}")
    if args.out:
        check_output_file(args.out, force=args.force, signature=ESTIMATE_SIGNATURE)
    record = estimate_build(recipe_config(args), (small, large))
    for stage, s in record["stages"].items():
        fixed = max(0.0, s["fixed_seconds"])  # a line through two noisy probes can cross below zero
        print(f"{stage:>17}: {s['steps']:>6} steps x {s['seconds_per_step']:.3f} s + {fixed:.1f} s "
              f"= {s['projected_seconds'] / 60:.1f} min")
    print(f"{'other':>17}: {(record['other_seconds'] + record['save_seconds']) / 60:.1f} min")
    print(f"projected build on this machine: {record['projected_minutes']:.1f} min (labels not included; the probes "
          f"took {record['probe_wall_seconds']:.0f} s)")
    if args.out:
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        print(f"estimate written to {args.out}")
