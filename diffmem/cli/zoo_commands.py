"""``diffmem zoo build | estimate | label | info | check-corpus``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from diffmem.cli.options import (
    add_file_force,
    add_force,
    add_verdict_options,
    handled_by,
    non_negative_int,
    positive_float,
    positive_int,
)
from diffmem.errors import DiffmemError
from diffmem.zoo.schedule import SCHEDULES

ZOO_WRITES = ("pipeline", "attribute_reader", "deepssim", "zoo.json", "manifest.jsonl", "labels.jsonl", "corpus")
LABEL_WRITES = ("labels.jsonl", "zoo.json", "runs")  # what `zoo label` writes into its --out (runs: generations)
LABELLERS = ("verdicts", "threshold")
CHECK_CORPUS_SIGNATURE = '"benchmark": "zoo-check-corpus"'  # the first line of the JSON: an --out file we wrote


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem zoo build | estimate | label | info | check-corpus``."""
    zoo = sub.add_parser("zoo", help="build, label or describe the memorization zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    here = "diffmem.cli.zoo_commands"
    build = handled_by(zsub.add_parser("build", help="train the zoo from its seed (resumable)"), f"{here}:run_build")
    build.add_argument("--out", required=True, help="folder to write the zoo to")
    add_force(build)
    build.add_argument("--work-dir", default=None,
                       help="checkpoint folder: new, empty, or the work folder of an earlier build (never a model "
                            "folder nor one of your folders); rerun to resume (default: OUT.work)")
    add_zoo_recipe(build)
    build.add_argument("--no-label", action="store_true", help="skip the ground-truth extraction (default: off)")
    estimate = handled_by(zsub.add_parser("estimate", help="project a build's time on this machine from two short "
                                          "probe builds, before training (docs/zoo-sd.md)"), f"{here}:run_estimate")
    add_zoo_recipe(estimate)
    estimate.add_argument("--probe-steps", type=positive_int, nargs=2, default=[5, 25], metavar=("SMALL", "LARGE"),
                          help="steps of every stage in the two probe builds (default: 5 25)")
    estimate.add_argument("--out", default=None, help="also write the estimate as JSON here (default: print only)")
    add_file_force(estimate)
    label = handled_by(zsub.add_parser("label", help="compute a zoo's ground-truth labels by extraction again, into "
                                       "a new folder (the zoo is only read)"), f"{here}:run_label")
    label.add_argument("--zoo", default=None, help="zoo folder to label (default: the embedded zoo; only read)")
    label.add_argument("--out", default="runs/zoo-label",
                       help="folder for labels.jsonl and zoo.json (the zoo's record with the new summary); never the "
                            "zoo itself (default: runs/zoo-label)")
    add_force(label)
    label.add_argument("--labeller", choices=LABELLERS, default="verdicts",
                       help="verdicts: --generations per caption, a binomial test of its matching generations against "
                            "the model's own generations of never-trained captions of its family, Benjamini-Hochberg "
                            "at --fdr (docs/zoo-sd.md); threshold: the earlier rule, memorized when any of --seeds "
                            "generations passes the family's 0.99 renderer-null quantile (default: verdicts)")
    label.add_argument("--generations", type=positive_int, default=16,
                       help="verdicts: generations per caption (default: 16); rerun to resume from OUT/runs")
    add_verdict_options(label, "verdicts: ")
    label.add_argument("--seeds", type=positive_int, default=4,
                       help="threshold labeller: generations per caption (default: 4)")
    label.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default: 25)")
    label.add_argument("--titles", type=positive_int, default=1000,
                       help="SD-like zoo: once-seen titles labelled, a fixed random sample (default: 1000)")
    info = handled_by(zsub.add_parser("info", help="print the zoo's manifest summary and labels table"),
                      f"{here}:run_info")
    info.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    check = handled_by(zsub.add_parser("check-corpus", help="the corpus gate, before training: does an ideal "
                                       "denoiser's guidance separate duplicated captions from ordinary ones? "
                                       "(docs/zoo-sd.md)"), f"{here}:run_check_corpus")
    check.add_argument("--corpus", choices=["sd", "collapse"], default="sd",
                       help="sd: the SD-like corpus; collapse: the shipped zoo's corpus (default: sd)")
    check.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the shipped zoo's pipeline/vae)")
    check.add_argument("--out", default=None,
                       help="also write the full report to this JSON file: a new file or an earlier report of this "
                            "command (default: none)")


def add_zoo_recipe(p: argparse.ArgumentParser) -> None:
    """The flags that make a zoo build's recipe (corpus, seed, steps, rates), shared by ``zoo build`` and
    ``zoo estimate`` so both read the same configuration. Each overrides one field of the corpus's config."""
    p.add_argument("--corpus", choices=["sd", "collapse"], default="sd",
                   help="sd: the SD-like corpus of docs/zoo-sd.md (the default zoo, zoo:sd, from "
                        "diffmem/zoo/checkpoint_sd); collapse: the collapse zoo's corpus (zoo:collapse, from "
                        "diffmem/zoo/checkpoint) (default: sd)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and training (default: 0)")
    p.add_argument("--unet-lr-schedule", choices=SCHEDULES, default=None,
                   help="denoiser learning-rate schedule (default: the corpus's config: collapse constant, sd "
                        "wsd); 'wsd' holds the peak rate, then decays over the last --unet-lr-decay-steps, so "
                        "a constant run's work folder resumes into it")
    overrides = (
        ("--vae-steps", positive_int, "VAE training steps (default: the corpus's config: collapse 1000, sd 1500)"),
        ("--unet-steps", positive_int,
         "denoiser training steps (default: the corpus's config: collapse 2000, sd 11000)"),
        ("--unet-lr-decay-steps", positive_int,
         "with --unet-lr-schedule wsd: how many final steps decay the rate (default: the corpus's config: sd 3000)"),
        ("--unet-lr", positive_float, "denoiser peak learning rate (default: the corpus's config)"),
        ("--unet-snr-gamma", positive_float, "weight the denoiser's loss by Min-SNR-gamma (Hang et al. 2023) with "
                                             "this gamma (default: the corpus's config)"),
        ("--unet-seed", non_negative_int, "seed of the denoiser stage alone (initial weights, batches, noise), so a "
                                          "replicate trains on the same corpus, VAE and reader (default: --seed)"),
        ("--reader-steps", positive_int,
         "attribute reader training steps (default: the corpus's config: collapse 600, sd 1800)"),
    )
    for flag, parse, text in overrides:
        p.add_argument(flag, type=parse, default=None, help=text)


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
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.zoo.build import build_zoo, check_work_dir, default_work_dir

    check_output_dir(args.out, "zoo-build", [], args.force, writes=ZOO_WRITES)
    check_work_dir(Path(args.work_dir or default_work_dir(args.out)), Path(args.out))  # before any training
    out = build_zoo(args.out, recipe_config(args), args.work_dir)
    print(f"zoo written to {out}")
    if args.no_label:
        return
    claim_output_dir(out, "zoo-build", ("labels.jsonl", "zoo.json"))
    # the labelling's generations go beside the training checkpoints, not into the zoo
    rows, summary = label_folder(out, work=Path(args.work_dir or default_work_dir(args.out)) / "labels")
    write_labels(out, out, rows, summary)


@dataclass(frozen=True)
class LabelRequest:
    """How ``zoo label`` / ``zoo build`` label a zoo (see the ``zoo label`` options)."""

    labeller: str = "verdicts"
    generations: int = 16
    fdr: float = 0.05
    null_level: float = 0.01
    seeds: int = 4
    steps: int = 25
    titles: int = 1000


def label_folder(folder: Path, request: LabelRequest = LabelRequest(), work: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> tuple[list[dict], dict]:
    """The ground-truth label rows and summary of a zoo folder of either corpus (the one its ``zoo.json`` names).

    ``verdicts`` (default): :func:`~diffmem.zoo.verdict_labels.label_zoo_by_verdicts`, the labeller of
    ``diffmem extract --null-prompts``, with its resumable generations under ``work``. ``threshold``: the earlier
    per-seed rule, the collapse zoo's every caption (:func:`~diffmem.zoo.labels.label_zoo`), the SD-like zoo's
    (:func:`~diffmem.zoo.sd_labels.label_sd_zoo`). Once-seen titles (SD-like zoo): a fixed random ``titles``.
    Writes nothing else: :func:`write_labels` puts rows and summary where the command may write."""
    from diffmem.models.loader import load_model
    from diffmem.zoo.load import load_corpus, zoo_corpus_name, zoo_training_set

    started = time.time()
    folder = Path(folder)
    model = load_model(folder / "pipeline")
    if request.labeller == "verdicts":
        from diffmem.zoo.verdict_labels import (
            ZooVerdictConfig,
            corpus_rows,
            label_zoo_by_verdicts,
            labeller_index,
            labels_record,
        )

        cfg = ZooVerdictConfig(generations=request.generations, steps=request.steps, titles=request.titles,
                               q=request.fdr, null_level=request.null_level)
        zoo_training_set(folder, model)  # the VAE round trip of the training images, through this model
        rows, summary = label_zoo_by_verdicts(model, corpus_rows(folder), labeller_index(folder),
                                              Path(work if work is not None else folder / "runs"), cfg)
        summary = labels_record(summary)
    elif zoo_corpus_name(folder) == "sd":
        from diffmem.zoo.sd_attributes import SDAttributeReader
        from diffmem.zoo.sd_labels import SDLabelConfig, label_sd_zoo

        rows, summary = label_sd_zoo(model, load_corpus(folder), SDAttributeReader.load(folder / "attribute_reader"),
                                     zoo_training_set(folder, model),
                                     SDLabelConfig(seeds_per_prompt=request.seeds, num_inference_steps=request.steps,
                                                   titles=request.titles), cache_dir=cache_dir)
    else:
        from diffmem.zoo.attributes import AttributeReader
        from diffmem.zoo.labels import LabelConfig, label_zoo

        rows, summary = label_zoo(model, load_corpus(folder), AttributeReader.load(folder / "attribute_reader"),
                                  LabelConfig(seeds_per_prompt=request.seeds, num_inference_steps=request.steps),
                                  training_set=zoo_training_set(folder, model), cache_dir=cache_dir)
    summary["seconds"] = round(time.time() - started, 1)  # the labelling's own cost, beside the build's stages
    return rows, summary


def write_labels(dest: Path, zoo: Path, rows: list[dict], summary: dict) -> None:
    """``labels.jsonl`` and ``zoo.json`` (``zoo``'s record with the new ``labels`` summary) into ``dest``, a folder
    the command owns (the zoo it just built, or ``zoo label``'s --out: never the zoo it read), and print the
    summary. A maintainer who wants to replace a zoo's labels copies both files in."""
    from diffmem.io import atomic_write_text
    from diffmem.zoo.manifest import write_jsonl

    dest = Path(dest)
    write_jsonl(dest / "labels.jsonl", rows)
    record = json.loads((Path(zoo) / "zoo.json").read_text())
    record["labels"] = summary
    atomic_write_text(dest / "zoo.json", json.dumps(record, indent=2))
    print(format_summary(summary))


def format_summary(summary: dict) -> str:
    """The labels table of a ``zoo.json`` ``labels`` record, of either labeller."""
    if summary.get("labeller") == "verdicts":
        return format_verdict_summary(summary)
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


def format_verdict_summary(summary: dict) -> str:
    """Verdict labels: the count sentence, then memorized captions per kind, signature rate and replication band."""
    lines = [summary["sentence"], "kind                 captions  memorized"]
    lines += [f"{kind:<20} {s['n']:>8}  {s['memorized']:>9}" for kind, s in summary["by_kind"].items()]
    lines.append("signature duplicated N times -> memorized")
    lines += [f"  {rate:>3}x  {s['memorized']} of {s['n']}" for rate, s in summary["signature_by_replication"].items()]
    lines.append("replication rate (share of matching generations) -> memorized")
    lines += [f"  {band:<13} {s['memorized']} of {s['n']}" for band, s in summary["by_replication_band"].items()]
    lines += [f"null of family {fam}: threshold {n['threshold']:.4f}, per-generation rate {n['rate']:.4f} "
              f"({n['n']} generations of {n['captions_kept']} never-trained captions)"
              for fam, n in summary["nulls"].items()]
    return "\n".join(lines)


def run_label(args: argparse.Namespace) -> None:
    """``diffmem zoo label``: label a zoo again into a new ``--out`` folder; the zoo itself (by default the one
    shipped inside the package) is only read."""
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.zoo.paths import zoo_dir

    zoo = Path(args.zoo) if args.zoo else zoo_dir()
    if not (zoo / "zoo.json").is_file():
        raise DiffmemError(f"--zoo '{zoo}' is not a zoo folder (no zoo.json); expected a folder `diffmem zoo build` "
                           "wrote")
    check_output_dir(args.out, "zoo-label", [zoo], args.force, writes=LABEL_WRITES)
    request = LabelRequest(labeller=args.labeller, generations=args.generations, fdr=args.fdr,
                           null_level=args.null_level, seeds=args.seeds, steps=args.steps, titles=args.titles)
    out = claim_output_dir(args.out, "zoo-label", LABEL_WRITES)  # claimed first: a killed run resumes from OUT/runs
    rows, summary = label_folder(zoo, request, work=out / "runs")
    write_labels(out, zoo, rows, summary)
    print(f"labels written to {out / 'labels.jsonl'} and {out / 'zoo.json'} (the zoo '{zoo}' is unchanged)")


def run_info(args: argparse.Namespace) -> None:
    from diffmem.zoo.manifest import read_jsonl
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
    from diffmem.io import atomic_write_text
    from diffmem.outputs import check_output_file
    from diffmem.zoo.gate import check_corpus, corpus_view, format_report, load_zoo_vae

    if args.out:  # checked before the work: a folder or a user's file is refused at once
        check_output_file(args.out, [args.vae], signature=CHECK_CORPUS_SIGNATURE, example="gate.json")
    report = check_corpus(corpus_view(args.corpus), load_zoo_vae(args.vae))
    print(format_report(report))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps({"benchmark": "zoo-check-corpus", **report}, indent=2))
        print(f"wrote {args.out}")


def run_estimate(args: argparse.Namespace) -> None:
    """``diffmem zoo estimate``: project the recipe's build time on this machine (:mod:`diffmem.zoo.estimate`)."""
    from diffmem.io import atomic_write_text
    from diffmem.outputs import check_output_file
    from diffmem.zoo.build import ZooBuildError
    from diffmem.zoo.estimate import ESTIMATE_SIGNATURE, estimate_build

    small, large = args.probe_steps
    if small >= large:
        raise ZooBuildError(f"--probe-steps: expected SMALL < LARGE; got {small} {large}")
    if args.out:
        check_output_file(args.out, signature=ESTIMATE_SIGNATURE, example="estimate.json")
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
