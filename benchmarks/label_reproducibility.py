"""Benchmark: do a zoo's labels reproduce on another machine? Compare a relabelled copy with the shipped labels.

    cp -a diffmem/zoo/checkpoint_sd runs/relabel                      # a copy: zoo label writes into it
    OMP_NUM_THREADS=2 .venv/bin/diffmem zoo label --zoo runs/relabel
    .venv/bin/python benchmarks/label_reproducibility.py --relabelled runs/relabel \
        --out benchmarks/results/experiments/zoo_sd_label_reproducibility.json

Labels are deterministic given their seeds, but a different CPU may round floating point differently. This
counts, field by field, the rows whose stored value differs between the two ``labels.jsonl`` and the largest
numeric difference, checks that every label decision (``memorized``, ``match``, ``memorized_seeds``,
``nn_item_id``) and the summary in ``zoo.json`` are the same, and records the relabelling's own seconds.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json
from diffmem.zoo.paths import SHIPPED_SD

DECISIONS = ("memorized", "match", "memorized_seeds", "nn_item_id")


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]


def _difference(a: object, b: object) -> float | None:
    """The largest absolute difference of two numbers or equal-length number lists; None if not numeric."""
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        parts = [_difference(x, y) for x, y in zip(a, b)]
        return None if any(p is None for p in parts) else max(parts, default=0.0)
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the working folder where it lies under it (results files name no machine's root)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def compare(relabelled: Path, reference: Path) -> dict:
    """The record of the module docstring for a relabelled zoo folder against a reference zoo folder."""
    new, old = _rows(relabelled), _rows(reference)
    if [r["caption"] for r in new] != [r["caption"] for r in old]:
        raise SystemExit(f"{relabelled}/labels.jsonl: expected the same captions, in order, as {reference}")
    differing: Counter[str] = Counter()
    largest: dict[str, float | None] = {}
    for a, b in zip(new, old):
        for key in a:
            if a[key] != b.get(key):
                differing[key] += 1
                d = _difference(a[key], b.get(key))
                largest[key] = None if d is None or largest.get(key, 0.0) is None else max(largest.get(key, 0.0), d)
    summary_new = json.loads((relabelled / "zoo.json").read_text())["labels"]
    summary_old = json.loads((reference / "zoo.json").read_text())["labels"]
    return {
        "benchmark": "label-reproducibility", "relabelled": _shown(relabelled), "reference": _shown(reference),
        "rows": len(new), "rows_differing": sum(a != b for a, b in zip(new, old)),
        "rows_differing_by_field": dict(differing), "largest_difference_by_field": largest,
        "decisions_identical": all(a[k] == b[k] for a, b in zip(new, old) for k in DECISIONS if k in a),
        "summary_identical": {k: v for k, v in summary_new.items() if k != "seconds"}
        == {k: v for k, v in summary_old.items() if k != "seconds"},
        "relabel_seconds": summary_new.get("seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relabelled", required=True, help="a zoo folder relabelled by `diffmem zoo label`")
    parser.add_argument("--reference", default=str(SHIPPED_SD), help="default: the shipped SD-like zoo")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    record = compare(Path(args.relabelled), Path(args.reference))
    atomic_write_text(args.out, portable_json(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
