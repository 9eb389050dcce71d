"""Benchmark: the zoo table (memorized fraction per replication rate, generic and held-out rates,
generic prompt fidelity, training time, parameter count), measured by extraction on the zoo.

    .venv/bin/python benchmarks/zoo_memorization.py --out benchmarks/results/zoo_memorization.json

With ``--write-labels`` the same run also (re)writes the zoo's ``labels.jsonl`` and the summary in
``zoo.json`` (this is what ``diffmem zoo label`` does). With ``--from-labels`` it only recomputes the
per-rate breakdown (``labels_breakdown``) from the zoo's stored ``labels.jsonl`` and copies the DeepSSIM
embedder's held-out agreement with SSIM (``deepssim/agreement.json``, written by the build), without sampling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffmem.cli.zoo_commands import format_summary, label_folder
from diffmem.io import atomic_write_text
from diffmem.zoo.load import load_labels
from diffmem.zoo.paths import zoo_dir


def deepssim_agreement(folder: Path) -> dict | None:
    """The zoo's DeepSSIM embedder against SSIM on held-out image pairs (written by the build)."""
    path = folder / "deepssim" / "agreement.json"
    return json.loads(path.read_text()) if path.is_file() else None


def breakdown(rows: list[dict]) -> dict:
    """Share of signature captions whose generation copies their *own* training image, per replication rate,
    and of template captions: the matching-verbatim column of the zoo table."""
    def own_share(sel: list[dict]) -> float:
        return round(sum(r["match"] == "own" for r in sel) / len(sel), 4)

    rates = sorted({r["replication"] for r in rows if r["kind"] == "signature"})
    return {"signature_match_own_by_replication": {str(rate): own_share([r for r in rows if r["kind"] == "signature"
                                                                         and r["replication"] == rate])
                                                   for rate in rates},
            "template_match_own": own_share([r for r in rows if r["kind"] == "template"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    parser.add_argument("--out", default="benchmarks/results/zoo_memorization.json")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--write-labels", action="store_true", help="also write labels.jsonl into the zoo")
    parser.add_argument("--cache", default=None, help="folder caching the generations (reruns skip sampling)")
    parser.add_argument("--from-labels", action="store_true",
                        help="only recompute labels_breakdown from the stored labels.jsonl into --out")
    args = parser.parse_args()
    folder = Path(args.zoo) if args.zoo else zoo_dir()
    if args.from_labels:
        result = json.loads(Path(args.out).read_text())
        result["labels_breakdown"] = breakdown(load_labels(folder))
        result["deepssim_agreement"] = deepssim_agreement(folder)
        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
        print(json.dumps(result["labels_breakdown"], indent=1))
        return
    started = time.time()
    if args.write_labels:
        summary = label_folder(folder, seeds=args.seeds, steps=args.steps, cache_dir=args.cache)
        rows = load_labels(folder)
    else:
        from diffmem.models.loader import load_model
        from diffmem.zoo.attributes import AttributeReader
        from diffmem.zoo.labels import LabelConfig, label_zoo
        from diffmem.zoo.load import load_corpus, zoo_training_set

        model = load_model(folder / "pipeline")
        rows, summary = label_zoo(model, load_corpus(folder), AttributeReader.load(folder / "attribute_reader"),
                               LabelConfig(seeds_per_prompt=args.seeds, num_inference_steps=args.steps),
                               training_set=zoo_training_set(folder, model), cache_dir=args.cache)
        print(format_summary(summary))
    record = json.loads((folder / "zoo.json").read_text())
    result = {"benchmark": "zoo_memorization", "zoo": str(folder), "labels": summary,
              "train_seconds": record["train_seconds"], "parameters": record["parameters"],
              "label_seconds": round(time.time() - started, 1), "versions": record["versions"],
              "labels_breakdown": breakdown(rows), "deepssim_agreement": deepssim_agreement(folder)}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
