"""Benchmark: the zoo table (memorized fraction per replication rate, generic and held-out rates,
generic prompt fidelity, training time, parameter count), measured by extraction on the zoo.

    .venv/bin/python benchmarks/zoo_memorization.py --zoo diffmem/zoo/checkpoint \
        --out benchmarks/results/zoo_memorization.json

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

from diffmem.io import atomic_write_text
from diffmem.models.loader import load_model
from diffmem.provenance import portable_json
from diffmem.zoo.attributes import AttributeReader
from diffmem.zoo.labels import LabelConfig, label_zoo
from diffmem.zoo.load import load_corpus, load_labels, zoo_training_set
from diffmem.zoo.manifest import write_jsonl
from diffmem.zoo.paths import zoo_dir


def format_summary(summary: dict) -> str:
    """The zoo table as text: memorized share and own-image share per kind, memorized share per rate."""
    lines = ["kind                 captions  memorized  nearest=own"]
    lines += [f"{kind:<20} {s['n']:>8}  {s['memorized']:>9.3f}  {s['match_own']:>11.3f}"
              for kind, s in summary["by_kind"].items()]
    lines.append("signature replication rate -> memorized fraction")
    lines += [f"  {rate:>3}x  ({s['n']} captions)  {s['memorized']:.3f}"
              for rate, s in summary["signature_by_replication"].items()]
    fid = summary.get("generic_fidelity", {})
    lines.append("generic prompt fidelity (shape+colour+position read back): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in fid.items() if v is not None))
    return "\n".join(lines)


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
    parser.add_argument("--zoo", default=None, help="zoo folder (default: the default zoo, zoo:sd; the shipped "
                             "zoo_memorization.json is the collapse zoo's: diffmem/zoo/checkpoint)")
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
        atomic_write_text(Path(args.out), portable_json(result))
        print(json.dumps(result["labels_breakdown"], indent=1))
        return
    started = time.time()
    model = load_model(folder / "pipeline")
    rows, summary = label_zoo(model, load_corpus(folder), AttributeReader.load(folder / "attribute_reader"),
                              LabelConfig(seeds_per_prompt=args.seeds, num_inference_steps=args.steps),
                              training_set=zoo_training_set(folder, model), cache_dir=args.cache)
    if args.write_labels:  # what `diffmem zoo label` does
        write_jsonl(folder / "labels.jsonl", rows)
        zoo_record = json.loads((folder / "zoo.json").read_text())
        atomic_write_text(folder / "zoo.json", json.dumps({**zoo_record, "labels": summary}, indent=2))
    print(format_summary(summary))
    record = json.loads((folder / "zoo.json").read_text())
    result = {"benchmark": "zoo_memorization", "zoo": str(folder), "labels": summary,
              "train_seconds": record["train_seconds"], "parameters": record["parameters"],
              "label_seconds": round(time.time() - started, 1), "versions": record["versions"],
              "labels_breakdown": breakdown(rows), "deepssim_agreement": deepssim_agreement(folder)}
    atomic_write_text(Path(args.out), portable_json(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
