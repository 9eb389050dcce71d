"""Benchmark: a zoo relabelled by verdicts at FDR 5% (:mod:`diffmem.zoo.verdict_labels`), beside its shipped labels.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/zoo_verdict_labels.py --model zoo:sd \
        --work runs/verdict-labels-sd --out benchmarks/results/zoo_sd_verdict_labels.json

Generations run in resumable parts under ``--work`` (rerun the same command after a kill; a run with more
``--titles`` extends one with fewer). The new ``labels.jsonl`` and ``zoo.json`` (the zoo's record with the new
labels summary, as ``diffmem zoo label`` writes it) are written there too, never into the zoo: a maintainer ships
them by copying both into the zoo folder. The results file holds the summary (memorized share
per kind, per signature replication count and per replication-rate band, the count with its bound, each
family's null and its overdispersion check), a cross-table of the shipped decision against the new one per
kind (with ``--compare-labels``), and the seconds taken. It names the model by name and fingerprint, no machine path.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from diffmem.io import atomic_write_text


def agreement(new: list[dict], old: list[dict]) -> dict[str, dict[str, int]]:
    """Per kind: how many captions each (shipped, new) pair of decisions has, e.g. ``memorized->not``."""
    shipped = {r["item_id"]: bool(r["memorized"]) for r in old}
    out: dict[str, Counter] = {}
    for r in new:
        if r["item_id"] not in shipped:
            continue
        key = f"{'memorized' if shipped[r['item_id']] else 'not'}->{'memorized' if r['memorized'] else 'not'}"
        out.setdefault(r["kind"], Counter())[key] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:sd", help="zoo:sd | zoo:collapse (default: zoo:sd)")
    ap.add_argument("--work", required=True, help="folder for the resumable generation runs and the new labels")
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--titles", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--compare-labels", default=None,
                    help="also cross-tabulate the new decisions against this labels file (default: none)")
    args = ap.parse_args(argv)

    from diffmem.eval.protocol import read_labels
    from diffmem.models.loader import load_model
    from diffmem.zoo.load import zoo_folder_for
    from diffmem.zoo.verdict_labels import (
        ZooVerdictConfig,
        corpus_rows,
        label_zoo_by_verdicts,
        labeller_index,
        labels_record,
    )

    start = time.perf_counter()
    zoo = zoo_folder_for(args.model)
    if zoo is None:
        raise SystemExit(f"--model {args.model}: expected a zoo (zoo:sd or zoo:collapse)")
    cfg = ZooVerdictConfig(generations=args.generations, titles=args.titles, batch_size=args.batch_size)
    model = load_model(args.model)
    index = labeller_index(zoo)
    labels, summary = label_zoo_by_verdicts(model, corpus_rows(zoo), index, args.work, cfg)
    work = Path(args.work)
    atomic_write_text(work / "labels.jsonl", "".join(json.dumps(r) + "\n" for r in labels))
    # the zoo's record with these labels, as `diffmem zoo label` writes it: copy both files into the zoo to ship them
    zoo_record = json.loads((zoo / "zoo.json").read_text())
    zoo_record["labels"] = labels_record(summary) | {"seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(work / "zoo.json", json.dumps(zoo_record, indent=2))
    record = {"model": {"name": args.model, "fingerprint": model.fingerprint}, "summary": summary,
              "seconds": round(time.perf_counter() - start, 1)}
    if args.compare_labels:
        record["compared_with"] = Path(args.compare_labels).name
        record["against_compared_labels"] = agreement(labels, read_labels(Path(args.compare_labels)))
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))
    print(summary["sentence"])
    print(json.dumps(summary["by_kind"], indent=1))


if __name__ == "__main__":
    main()
