"""``diffmem demo``: load the model, print its zoo's label summary, generate memorized vs generic grids, scan.

The zoo is the one the model came from (``--model zoo:collapse`` shows the collapse zoo); a model that is not a
zoo is shown on the default zoo's captions and training images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffmem.cli.options import add_force, add_model_args, handled_by, lazy_reexports, non_negative_int, positive_int

_MOVED = {"image_grid": "diffmem.images", "stack": "diffmem.images", "titled": "diffmem.images",
          "load_model": "diffmem.models.loader", "SSIMMatcher": "diffmem.eval.matching"}
__getattr__ = lazy_reexports(__name__, _MOVED)


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem demo``."""
    demo = handled_by(sub.add_parser("demo", help="load a model (default: the zoo), show its manifest, generate a "
                                                  "sample grid"), "diffmem.cli.demo:run_demo")
    add_model_args(demo)
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    add_force(demo)
    demo.add_argument("--per-group", type=positive_int, default=6, help="prompts per group in the grid (default: 6)")
    demo.add_argument("--seeds", type=positive_int, default=3, help="seeds per prompt (default: 3)")
    demo.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    demo.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    demo.add_argument("--draws", type=positive_int, default=8, help="noise draws of the closing scan (default: 8)")
    demo.add_argument("--scan-prompts", type=positive_int, default=400,
                      help="zoo captions in the closing scan (default: 400)")
    demo.add_argument("--scan-samples", type=non_negative_int, default=2,
                      help="generations per caption of the scan's nn-margin detector, 0 to skip it (default: 2)")
    demo.add_argument("--no-report", action="store_true", help="skip the closing scan and HTML report (default: off)")


def run_demo(args: argparse.Namespace) -> None:
    """The demo: the zoo's memorization table, a grid of generations beside their nearest training images,
    then (unless ``--no-report``) a scan of zoo captions with its detection figures and the HTML report."""
    from diffmem.cli.options import resolve_device
    from diffmem.cli.zoo_commands import format_summary
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.zoo.load import load_corpus, zoo_folder_of
    from diffmem.zoo.paths import zoo_dir

    started = time.time()
    writes = ["grid.png", "provenance.json", "report.html"]  # and one scan-<digest> folder per scan's settings
    device = resolve_device(args.device)
    check_output_dir(args.out, "demo", [args.model or zoo_dir()], args.force, writes=writes)
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    folder = zoo_folder_of(model) or zoo_dir()  # the zoo's captions and training images
    record = json.loads((folder / "zoo.json").read_text())
    items = load_corpus(folder)
    print(f"model: {model.source} (fingerprint {model.fingerprint}, {model.describe()['dtype']} on {model.device})")
    print(f"zoo: {len(items)} captions, {sum(it.trained for it in items)} trained; "
          f"trained in {record['train_seconds'] / 60:.1f} min")
    if "labels" in record:
        print(format_summary(record["labels"]))
    out = claim_output_dir(args.out, "demo", writes)
    _memorization_grid(args, model, folder, out, started)
    if args.no_report:
        return
    scan_dir = _scan_zoo_captions(args, model, folder, out)
    from diffmem.report import build_report
    from diffmem.zoo.gallery import ZooGallery

    report = build_report([scan_dir], out / "report.html", gallery_size=6, gallery=ZooGallery(model))
    print(f"\nHTML report: {report}")


def _memorization_grid(args: argparse.Namespace, model, folder: Path, out: Path, started: float) -> None:
    """Generations of memorized and generic captions beside their nearest training image: ``grid.png``, the
    table of best SSIM per caption, and ``provenance.json``."""
    import torch

    from diffmem.eval.matching import SSIMMatcher
    from diffmem.images import image_grid, stack, titled
    from diffmem.io import atomic_write_text
    from diffmem.outputs import make_shareable
    from diffmem.zoo.load import load_labels, zoo_training_set

    labels = load_labels(folder)
    memorized = sorted((r for r in labels if r["kind"] == "signature" and r["memorized"]),
                       key=lambda r: (-r["replication"], r["item_id"]))[: args.per_group]
    generic = [r for r in labels if r["kind"] == "generic"][:: max(1, len(labels) // 50)][: args.per_group]
    train = zoo_training_set(folder).reference
    matcher = SSIMMatcher().fit(train)
    groups = {"memorized (signature)": memorized, "generic": generic}
    panels, table = [], []
    for name, rows in groups.items():
        prompts = [r["caption"] for r in rows for _ in range(args.seeds)]
        seeds = [s for _ in rows for s in range(args.seeds)]
        images = model.sample(prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance).images
        match = matcher.match(images)
        nearest = train[match.index]
        sims = match.similarity.view(len(rows), args.seeds)
        grid_rows = []
        for i, r in enumerate(rows):
            block = images[i * args.seeds : (i + 1) * args.seeds]
            best = i * args.seeds + int(sims[i].argmax())
            grid_rows.append(torch.cat([block, nearest[best : best + 1]]))
            table.append({"group": name, "caption": r["caption"], "replication": r["replication"],
                          "max_ssim_to_nearest_training_image": round(float(sims[i].max()), 3)})
        title = f"{name}: {args.seeds} seeds | nearest training image (via the zoo VAE)"
        panels.append(titled(image_grid(grid_rows), title))
    stack(panels).save(out / "grid.png")
    make_shareable(out / "grid.png")
    print("\nprompt                                                              rate  max SSIM to nearest")
    for row in table:
        print(f"{row['caption'][:66]:<66} {row['replication']:>4}  {row['max_ssim_to_nearest_training_image']:.3f}")
    provenance = {"model": model.describe(), "steps": args.steps, "guidance": args.guidance,
                  "seeds": list(range(args.seeds)), "rows": table, "seconds": round(time.time() - started, 1)}
    atomic_write_text(out / "provenance.json", json.dumps(provenance, indent=2))
    print(f"\ngrid: {out / 'grid.png'}  provenance: {out / 'provenance.json'}")


def _scan_zoo_captions(args: argparse.Namespace, model, folder: Path, out: Path) -> Path:
    """Scan zoo captions (memorized and not, evenly spaced) with the noise-step detectors (and nn-margin), print
    each detector's top prompts and AUROC against the zoo's labels; returns the scan folder."""
    import numpy as np
    import pyarrow.parquet as pq

    from diffmem.cli.scan_commands import print_summary
    from diffmem.detectors import make_detector
    from diffmem.eval.detection import detection_metrics
    from diffmem.jobs import prompt_hash, settings_digest
    from diffmem.outputs import claim_output_dir
    from diffmem.scan import ScanSettings, run_scan
    from diffmem.zoo.prompts import zoo_prompts, zoo_reference_prompts

    prompts = zoo_prompts(max_negatives_per_kind=200, folder=folder).evenly(args.scan_prompts)
    print(f"\nscanning {len(prompts)} zoo captions (memorized and not, evenly spaced) with noise-norm and "
          f"anisotropy ({args.draws} noise draws) and nn-margin ({args.scan_samples} generation(s), 8 of 10 steps)")
    detectors = [make_detector("noise-norm"), make_detector("anisotropy"),
                 make_detector("anisotropy-calibrated", reference_prompts=zoo_reference_prompts(folder=folder))]
    detectors += [make_detector("nn-margin", samples=args.scan_samples)] if args.scan_samples else []
    # one folder per model, prompts and scan settings: a rerun with the same ones resumes it; a new zoo (or new
    # labels, or other settings) scans into its own instead of being refused by the earlier run's, kept as it was
    scan_key = [model.fingerprint, prompt_hash(prompts), args.draws, args.scan_samples]
    scan_dir = out / f"scan-{settings_digest(scan_key)}"
    claim_output_dir(args.out, "demo", [scan_dir.name])
    scores = run_scan(model, prompts, detectors, scan_dir, ScanSettings(n_draws=args.draws))
    table = pq.read_table(scores)
    print_summary(table, [d.name for d in detectors if d.name in ("noise-norm", "nn-margin")], 5)
    memorized = np.array(prompts.columns["memorized"], dtype=bool)
    print(f"\nagainst the zoo's labels ({int(memorized.sum())} memorized of {len(prompts)}; benchmarks/detection.py "
          "measures every detector):")
    for d in detectors:
        m = detection_metrics(memorized, table.column(d.name).to_numpy())
        print(f"  {d.name:<22} AUROC {m['auroc']:.3f}  TPR@1%FPR {m['tpr@0.01fpr']['strict']:.3f}")
    return scan_dir
