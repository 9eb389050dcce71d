"""Benchmark: the zoo table (memorized fraction per replication rate, generic and held-out rates,
generic prompt fidelity, training time, parameter count), measured by extraction on the zoo.

    .venv/bin/python benchmarks/zoo_memorization.py --out benchmarks/results/zoo_memorization.json

With ``--write-labels`` the same run also (re)writes the zoo's ``labels.jsonl`` and the summary in
``zoo.json`` (this is what ``diffmem zoo label`` does).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffmem.cli.zoo_commands import format_summary, label_folder
from diffmem.io import atomic_write_text
from diffmem.zoo.paths import zoo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    parser.add_argument("--out", default="benchmarks/results/zoo_memorization.json")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--write-labels", action="store_true", help="also write labels.jsonl into the zoo")
    parser.add_argument("--cache", default=None, help="folder caching the generations (reruns skip sampling)")
    args = parser.parse_args()
    folder = Path(args.zoo) if args.zoo else zoo_dir()
    started = time.time()
    if args.write_labels:
        summary = label_folder(folder, seeds=args.seeds, steps=args.steps, cache_dir=args.cache)
    else:
        from diffmem.models.loader import load_model
        from diffmem.zoo.attributes import AttributeReader
        from diffmem.zoo.labels import LabelConfig, label_zoo
        from diffmem.zoo.load import load_corpus, zoo_training_set

        model = load_model(folder / "pipeline")
        _, summary = label_zoo(model, load_corpus(folder), AttributeReader.load(folder / "attribute_reader"),
                               LabelConfig(seeds_per_prompt=args.seeds, num_inference_steps=args.steps),
                               training_set=zoo_training_set(folder, model), cache_dir=args.cache)
        print(format_summary(summary))
    record = json.loads((folder / "zoo.json").read_text())
    result = {"benchmark": "zoo_memorization", "zoo": str(folder), "labels": summary,
              "train_seconds": record["train_seconds"], "parameters": record["parameters"],
              "label_seconds": round(time.time() - started, 1), "versions": record["versions"]}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
