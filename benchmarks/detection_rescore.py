"""Benchmark: the shipped detection scores judged against another labels file (no model call).

    .venv/bin/python benchmarks/detection_rescore.py --out benchmarks/results/detection_sd_verdicts.json

Reads ``--scores`` (default: ``detection_sd_scores.parquet``, every detector's score of every caption the
detection benchmark scanned) and the UNet calls of each detector from ``--record`` (its JSON), keeps the captions
the labels file labels, and runs the held-out protocol (:func:`diffmem.eval.protocol.evaluate_split`: every
choice on dev, every figure on test) over ``--split-seeds``. With verdict labels (a ``replication_rate``
column) it also reports, on test, each detector's AUROC and TPR@1%FPR per replication-rate band of the
positives (0, (0, 0.25), [0.25, 0.75), >= 0.75) against all test negatives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffmem.eval.protocol import (
    Entry,
    Target,
    evaluate_split,
    metrics_or_none,
    over_split_seeds,
    read_labels,
    split_captions,
    strata_of,
    uses_training_images,
)
from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json
from diffmem.zoo.prompts import NEGATIVE_GROUPS
from diffmem.zoo.verdict_labels import REPLICATION_BANDS, replication_band

RESULTS = Path(__file__).resolve().parent / "results"


def rescore(scores_path: Path, record_path: Path, labels_path: Path, split_seeds: list[int],
            dev_fraction: float = 0.5) -> dict:
    """The record of the module docstring."""
    table = pq.read_table(scores_path)
    record = json.loads(record_path.read_text())
    rows = {r["caption"]: r for r in read_labels(labels_path)}
    texts = table.column("text").to_pylist()
    keep = np.array([t in rows for t in texts])
    texts = [t for t, k in zip(texts, keep) if k]
    y = np.array([bool(rows[t]["memorized"]) for t in texts])
    kinds = [rows[t]["kind"] for t in texts]
    rates = np.array([rows[t].get("replication_rate", np.nan) for t in texts], dtype=np.float64)
    detectors = [c for c in table.column_names if c not in ("id", "text")]
    entries = []
    for name in detectors:
        calls = record["results"].get(name, {}).get("unet_calls_per_prompt", float("nan"))
        base = name.split(" (")[0]
        entries.append(Entry(name, table.column(name).to_numpy(zero_copy_only=False)[keep].astype(np.float64),
                             calls, uses_training_images({"name": base}), None))
    target, splits = Target(), {}
    for seed in split_seeds:
        split = split_captions(texts, strata_of(kinds, y.tolist()), seed, dev_fraction)
        report = evaluate_split(entries, y, kinds, split, target, None, NEGATIVE_GROUPS)
        if np.isfinite(rates).any():
            bands = np.array([replication_band(r) if np.isfinite(r) else "" for r in rates])
            test = np.zeros(len(y), dtype=bool)
            test[split.test] = True
            report["test_by_replication_band"] = {
                e.name: {b: metrics_or_none(y[test & ((~y) | (bands == b))], e.scores[test & ((~y) | (bands == b))])
                         for b in sorted(set(bands[y]))} for e in entries}
        splits[str(seed)] = report
    return {"benchmark": "detection_rescore", "scores_file": scores_path.name, "labels": labels_path.name,
            "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
            "positives_by_kind": {k: int(sum(p and kk == k for p, kk in zip(y, kinds))) for k in sorted(set(kinds))},
            "positives_by_band": ({b: int(sum(replication_band(r) == b for r, p in zip(rates, y) if p))
                                   for b in REPLICATION_BANDS}
                                  if np.isfinite(rates).any() else None),
            "target": target.describe(), "splits": splits,
            "over_split_seeds": over_split_seeds(splits) if len(splits) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scores", default=str(RESULTS / "detection_sd_scores.parquet"))
    ap.add_argument("--record", default=str(RESULTS / "experiments" / "detection_sd_threshold_labels.json"),
                    help="the detection benchmark's record of the scan behind --scores (UNet calls per detector)")
    ap.add_argument("--labels", default=str(Path(__file__).resolve().parents[1] / "diffmem" / "zoo" / "checkpoint_sd"
                                            / "labels.jsonl"), help="labels file (default: the default zoo's)")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = rescore(Path(args.scores), Path(args.record), Path(args.labels), args.split_seeds)
    atomic_write_text(Path(args.out), portable_json(out))
    print(f"{out['n_pos']} positives, {out['n_neg']} negatives; positives by band: {out['positives_by_band']}")
    for seed, rep in out["splits"].items():
        for name, m in rep["detectors"].items():
            t = m["test"]
            if t.get("auroc") is not None:
                print(f"split {seed}  {name:<56} test AUROC {t['auroc']:.4f}  TPR@1% {t['tpr@0.01fpr']['strict']:.3f}")


if __name__ == "__main__":
    main()
