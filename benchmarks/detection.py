"""Benchmark: every detector on the zoo — AUROC, TPR@1%/0.1% FPR (both estimators), UNet calls per prompt.

Positives: captions the zoo's labels call memorized (found by extraction). Negatives: the other
captions (ordinary objects and scenes, held-out generic, never-trained look-alike scenes,
non-memorized signature items), at most ``--max-per-kind`` evenly spaced captions of each kind, and
never the ordinary reference captions that ``anisotropy-calibrated`` standardises on.

    .venv/bin/python benchmarks/detection.py --out benchmarks/results/detection.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffmem.cli.scan_commands import zoo_prompts, zoo_reference_prompts
from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.eval.detection import detection_metrics, plot_roc
from diffmem.io import atomic_write_text
from diffmem.models import load_model
from diffmem.scan import ScanSettings, run_scan

COMBINATIONS = [["noise-norm", "sharpness", "attention-entropy"],  # noise-step signals only
                ["nn-margin", "sharpness", "attention-entropy"]]  # the image margin with the two best of them


def replication_rates(prompts, rates: Path) -> np.ndarray:
    """Each prompt's replication rate over every labelled seed, from ``label_stability.py``'s rates file
    (shipped + retest generations), NaN where the file is absent."""
    if not rates.is_file():
        return np.full(len(prompts.ids), np.nan)
    by_id = {str(r["item_id"]): r["replication_rate"] for r in map(json.loads, rates.read_text().splitlines())}
    return np.array([by_id[i] for i in prompts.ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--trajectory-steps", type=int, default=10)
    parser.add_argument("--max-per-kind", type=int, default=600, help="negatives kept per caption kind")
    parser.add_argument("--work", default="runs/bench-detection")
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    parser.add_argument("--image-samples", type=int, default=4,
                        help="generations per prompt of nn-ratio (0: skip both image detectors)")
    parser.add_argument("--margin-samples", type=int, default=8, help="nn-margin's own (default: 8, its default)")
    parser.add_argument("--rates", default="benchmarks/results/zoo_replication_rates.jsonl",
                        help="label_stability.py's rates file: adds the confident-subset metrics (skipped if absent)")
    args = parser.parse_args()
    model = load_model()
    reference = set(zoo_reference_prompts())
    prompts = zoo_prompts(args.max_per_kind, exclude=reference)
    y = np.array(prompts.columns["memorized"], dtype=bool)
    kinds = np.array(prompts.columns["kind"])
    families = np.array(prompts.columns["family"])
    mixed = [f for f in sorted(set(families)) if y[families == f].any() and (~y[families == f]).any()]
    rate = replication_rates(prompts, Path(args.rates))
    confident = (rate >= 0.5) | (rate == 0)
    results, curves, combined_keys = {}, {}, {}
    image_detectors = ([make_detector("nn-ratio", samples=args.image_samples, steps=10, stop_after=4),
                        make_detector("nn-margin", samples=args.margin_samples, steps=10, stop_after=8)]
                       if args.image_samples else [])
    pretty = {"noise-norm-trajectory": f"noise-norm-trajectory (steps={args.trajectory_steps}, gens=4)",
              **{d.name: f"{d.name} (samples={d.samples}, {d.stop_after}/{d.steps} steps)" for d in image_detectors}}
    for draws in args.draws:
        detectors = [make_detector("noise-norm"), make_detector("anisotropy"),
                     make_detector("anisotropy-calibrated", reference_prompts=sorted(reference))]
        if draws == args.draws[0]:
            detectors += [make_detector("attention-entropy"), make_detector("sharpness"),
                          make_detector("noise-norm-trajectory", steps=args.trajectory_steps, generations=4)]
        start = time.perf_counter()
        path = run_scan(model, prompts, detectors, Path(args.work) / f"draws{draws}", ScanSettings(n_draws=draws))
        seconds = time.perf_counter() - start
        table = pq.read_table(path)
        engine = NoiseStepEngine(model, draws)
        scores = {d.name: table.column(d.name).to_numpy() for d in detectors}
        if draws == args.draws[0]:  # image-space detectors: one scan folder each, same prompts
            for det in image_detectors:
                start = time.perf_counter()
                image_path = run_scan(model, prompts, [det], Path(args.work) / f"image-{det.name}-s{det.samples}",
                                      ScanSettings(n_draws=1))
                image_seconds = time.perf_counter() - start
                results[f"_scan_seconds_{det.name}"] = round(image_seconds, 1) if image_seconds > 5 else "resumed"
                scores[det.name] = pq.read_table(image_path).column(det.name).to_numpy()
            detectors += image_detectors
        if draws == args.draws[0]:  # z-score combinations, from the stored member columns
            for members in COMBINATIONS[: 2 if image_detectors else 1]:
                same_settings = {d.name: {k: v for k, v in d.config().items() if k != "name"}
                                 for d in image_detectors if d.name in members}  # as scanned above
                combined = make_detector("combined", members=members, reference_prompts=sorted(reference),
                                         member_options=same_settings)
                combined.prepare(engine)
                key = f"combined ({' + '.join(members)})"
                scores[key] = combined.combine(scores).numpy()
                detectors.append(combined)
                combined_keys[id(combined)] = key
        for det in detectors:
            name = combined_keys.get(id(det), det.name)
            key = name if id(det) in combined_keys else pretty.get(det.name, f"{det.name} (draws={draws})")
            s = scores[name]
            m = detection_metrics(y, s)
            m["unet_calls_per_prompt"] = det.unet_calls_per_prompt(engine)
            m["by_kind_of_positive"] = {k: detection_metrics(y[(~y) | (kinds == k)], s[(~y) | (kinds == k)])["auroc"]
                                        for k in sorted(set(kinds[y]))}
            # within one caption family (zoo v1: memorized scenes vs the scenes that generalised), so a score
            # that only tells the two families apart cannot look good here
            m["within_family"] = {f: detection_metrics(y[families == f], s[families == f])["auroc"] for f in mixed}
            if np.isfinite(rate).any():  # stable labels only: replicates in >= half of all seeds, or in none
                c = confident & np.isfinite(rate)
                m["confident"] = detection_metrics(rate[c] >= 0.5, s[c])
            results[key] = m
            curves[key] = (y, s)
        # a rerun resumes completed scans: their time is in the earlier run's record, not this one's
        results[f"_scan_seconds_draws{draws}"] = round(seconds, 1) if seconds > 5 else "resumed"
    plot_roc(curves, Path(args.out).with_suffix(".png"), title=f"zoo: {int(y.sum())} memorized, {int((~y).sum())} not")
    record = {"benchmark": "detection", "model": model.describe(), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
              "by_kind": {k: {"positives": int((y & (kinds == k)).sum()), "negatives": int((~y & (kinds == k)).sum())}
                          for k in sorted(set(kinds))},
              "reference_prompts_excluded": len(reference), "max_negatives_per_kind": args.max_per_kind,
              "confident_subset": {"source": args.rates, "positives": int((rate >= 0.5).sum()),
                                   "negatives": int((rate == 0).sum())} if np.isfinite(rate).any() else None,
              "results": results}
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))
    print(f"{'detector':<48} {'AUROC':>7} {'TPR@1% strict/closest':>22} {'calls':>7}")
    for k, m in results.items():
        if not k.startswith("_"):
            t = m["tpr@0.01fpr"]
            within = " ".join(f"{f}={a:.3f}" for f, a in m["within_family"].items())
            if "confident" in m:
                c = m["confident"]
                within += f"  confident: AUROC {c['auroc']:.3f} TPR@1% {c['tpr@0.01fpr']['strict']:.3f}"
            print(f"{k:<48} {m['auroc']:7.4f} {t['strict']:10.3f}/{t['closest']:.3f} {m['unet_calls_per_prompt']:7.0f}"
                  f"  within family: {within}")


if __name__ == "__main__":
    main()
