"""Benchmark: a zoo's after-training gates (issue #11; docs/zoo-sd.md, training plan step 6), for either zoo.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/zoo_gates.py --model zoo:sd --labels-from-zoo \
        --out benchmarks/results/zoo_sd_gates.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/zoo_gates.py --model zoo:collapse \
        --out benchmarks/results/zoo_collapse_gates.json

``--model`` names the zoo (default ``zoo:sd``; also a zoo folder, or its ``pipeline`` folder); ``--smoke`` runs
tiny sizes (a few captions, 2 DDIM steps) to check the script end to end. The computations live in
:mod:`diffmem.zoo.sd_gates` and :mod:`diffmem.zoo.sd_labels`. The labels behind the memorization gates are
either a fixed random sample of each kind labelled here with the rule of ``diffmem zoo label`` (thresholds from
the same null over the whole corpus; sizes in the JSON's ``sizes``) or, with ``--labels-from-zoo``, every
caption of the zoo's own ``labels.jsonl`` (what ``diffmem zoo label`` wrote; the collapse zoo always, its
labeller is the collapse rule). Then ``diversity_seeds`` images of ordinary and memorized captions, and every
gate as ``{value, target, pass}``. Named-factor fidelity: the SD-like zoo's reader on the 8-seed ordinary
generations (each factor apart); the collapse zoo's labels' fidelity of generic captions (shape, colour and
position read back by its reader), the only factors its captions leave to the model.

Default sizes (about 3,000 generations at 25 steps; the collapse zoo's architecture generates 128 images in
21 s on one niced thread of the shared 2-core machine; with SSIM matching, about 85,000 pairs, and the training
set's render and VAE round trip, about 8-12 minutes on 2 cores):
96 ordinary captions, all 29 held-out ordinary ones, all 64 signatures, all 300 look-alike titles, all template
captions, 100 once-seen titles, 4 seeds each; diversity and fidelity on 48 ordinary captions and every
signature duplicated >= 16x, 8 seeds each. ``--fresh-label-seeds`` labels every ordinary caption (and the default
sample of the other kinds) with generation seeds that ``labels.jsonl`` never used: a build chosen because its labels
passed the gates is then measured on a second, independent draw.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from diffmem.errors import ModelLoadError
from diffmem.io import atomic_write_text
from diffmem.models.loader import load_model
from diffmem.models.sources import resolve
from diffmem.provenance import portable_json
from diffmem.zoo.load import load_corpus, load_labels, zoo_corpus_name, zoo_folder_for, zoo_training_set
from diffmem.zoo.sd_attributes import SDAttributeReader, fidelity_by_value
from diffmem.zoo.sd_corpus import SDItem
from diffmem.zoo.sd_gates import caption_diversity, diversity_config, named_fidelity, sd_gates
from diffmem.zoo.sd_labels import SDLabelConfig, fresh_sd_image, label_sd_zoo, summarise_by_family


@dataclass(frozen=True)
class Sizes:
    """How many captions of each kind are labelled (``None``: all), and the diversity set; saved in the JSON."""

    generic: int | None = 96
    heldout_generic: int | None = None
    signature: int | None = None
    heldout_signature: int | None = None
    template: int | None = None
    heldout_template: int | None = None
    title: int | None = 100
    label_seeds: int = 4
    diversity_ordinary: int = 48
    diversity_memorized: int | None = None  # signatures duplicated >= diversity_min_rate
    diversity_min_rate: int = 16
    diversity_seeds: int = 8
    steps: int = 25
    null_captions: int = 300
    sample_seed: int = 0


# --fresh-label-seeds: generation seeds start here, far from labels.jsonl's (item_id * k + j, a few thousand) and
# from the diversity draws' (10^9 on)
FRESH_LABEL_SEED_OFFSET = 5 * 10**8

SMOKE = Sizes(generic=4, heldout_generic=2, signature=None, heldout_signature=4, template=2, heldout_template=2,
              title=4, label_seeds=2, diversity_ordinary=3, diversity_memorized=2, diversity_min_rate=1,
              diversity_seeds=3, steps=2, null_captions=8)


def zoo_folder(spec: str) -> Path:
    """The zoo folder (``zoo.json`` inside) of a model spec (:func:`zoo_folder_for`), or exit with one line: the
    loader's own (e.g. zoo:sd not built yet) or that the spec is not a zoo."""
    folder = zoo_folder_for(spec)
    if folder is not None:
        return folder
    try:
        resolve(spec)
    except ModelLoadError as exc:
        raise SystemExit(f"zoo_gates: {exc}") from None
    raise SystemExit(f"zoo_gates: '{spec}' is not a zoo (no zoo.json beside its pipeline)")


def fresh_renders(items: list[SDItem], k: int, seed: int) -> torch.Tensor:
    """``k`` fresh renders per caption of what the corpus would train on for it (its named factors, the rest
    drawn anew), caption after caption, in [0, 1]: the reader's read-back on these bounds what generations can
    score."""
    rng = np.random.default_rng([seed, 11])
    images = np.stack([fresh_sd_image(it, rng) for it in items for _ in range(k)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def sample(items: list[SDItem], n: int | None, rng: np.random.Generator) -> list[SDItem]:
    """A fixed random ``n`` of ``items`` (all when ``n`` is None or larger), in corpus order."""
    if n is None or n >= len(items):
        return list(items)
    keep = set(rng.permutation(len(items))[:n].tolist())
    return [it for i, it in enumerate(items) if i in keep]


def choose(items: list[SDItem], sizes: Sizes, exclude: frozenset[str] = frozenset()
           ) -> tuple[list[SDItem], list[SDItem], list[SDItem]]:
    """(captions to label, ordinary and memorized captions of the diversity set); ordinary captions in
    ``exclude`` are not drawn (a second sample disjoint from a first)."""
    rng = np.random.default_rng(sizes.sample_seed)
    by_kind = {kind: [it for it in items if it.kind == kind] for kind in dict.fromkeys(it.kind for it in items)}
    label = [it for kind, sel in by_kind.items() for it in sample(sel, getattr(sizes, kind), rng)]
    label.sort(key=lambda it: it.item_id)
    ordinary = sample([it for it in by_kind.get("generic", []) if it.caption not in exclude],
                      sizes.diversity_ordinary, rng)
    memorized = sample([it for it in by_kind.get("signature", []) if it.replication >= sizes.diversity_min_rate],
                       sizes.diversity_memorized, rng)
    return label, ordinary, memorized


def gate_labels(folder: Path, model, items: list, reader, cfg: SDLabelConfig, label_items: list, from_zoo: bool):
    """The label rows the memorization gates count: the zoo's own ``labels.jsonl`` (its config and the captions it
    labels), or a sample labelled here with ``cfg``. Returns (rows, summary, cfg, labelled items)."""
    if from_zoo:
        record = json.loads((folder / "zoo.json").read_text())["labels"]
        rows = load_labels(folder)
        labelled = {r["caption"] for r in rows}
        if record.get("labeller") == "verdicts":
            # a caption that only generalises is called with probability at most the BH cut on its p-value
            summary = {k: record.get(k) for k in ("by_kind", "signature_by_replication", "thresholds")}
            summary |= {"generic_fidelity": None, "null_rate": record["count"]["cut"], "label_config":
                        record["label_config"], "labeller": "verdicts"}
            return rows, summary, cfg, [it for it in items if it.caption in labelled]
        summary = {k: record.get(k) for k in ("by_kind", "signature_by_replication", "thresholds", "generic_fidelity")}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in record["label_config"].items()
                                          if k in {f.name for f in dataclasses.fields(cfg)}})
        return rows, summary, cfg, [it for it in items if it.caption in labelled]
    rows, summary = label_sd_zoo(model, items, reader, zoo_training_set(folder, model), cfg, selection=label_items)
    return rows, summary, cfg, label_items


def diversity_and_fidelity(model, reader, ordinary: list, memorized: list, cfg: SDLabelConfig, sizes: Sizes,
                           summary: dict):
    """Per-caption mean pairwise SSIM of ordinary and memorized captions' generations, named-factor fidelity of
    the ordinary ones, and (SD-like zoo) the reader's ceiling on fresh renders and fidelity per named value."""
    div_cfg = diversity_config(cfg, sizes.diversity_seeds)
    ordinary_ssim, ordinary_gen = caption_diversity(model, ordinary, div_cfg)
    memorized_ssim, _ = caption_diversity(model, memorized, div_cfg)
    reader_ceiling, by_value = None, None
    if reader is not None:
        fid = named_fidelity(reader, ordinary_gen, ordinary, sizes.diversity_seeds)
        # the instrument's own ceiling: the same reader on fresh training-distribution renders of the same captions
        renders = fresh_renders(ordinary, sizes.diversity_seeds, sizes.sample_seed)
        reader_ceiling = named_fidelity(reader, renders, ordinary, sizes.diversity_seeds)
        per_image = [it.named for it in ordinary for _ in range(sizes.diversity_seeds)]
        by_value = {"generations": fidelity_by_value(reader, ordinary_gen, per_image),
                    "training_renders": fidelity_by_value(reader, renders, per_image)}
    elif summary.get("generic_fidelity"):  # the collapse zoo's threshold labels: their generic captions' read-back
        fid = {"all": float(summary["generic_fidelity"]["generic"])}
    else:  # the collapse zoo's reader on the ordinary generations: shape, colour and position read back
        from diffmem.tasks.zoo import zoo_object_fidelity

        fid = {"all": zoo_object_fidelity(ordinary_gen, [it.caption for it in ordinary
                                                         for _ in range(sizes.diversity_seeds)])}
    return ordinary_ssim, memorized_ssim, fid, reader_ceiling, by_value


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo:sd", help="zoo:sd (default), zoo:collapse, a zoo folder or its "
                                                          "pipeline folder")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/zoo_<corpus>_gates.json")
    parser.add_argument("--labels-from-zoo", action="store_true",
                        help="gate on every caption of the zoo's labels.jsonl instead of labelling a sample here "
                             "(always for the collapse zoo)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 DDIM steps: checks the script only")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="seed of the caption samples (default 0: the shipped gates files)")
    parser.add_argument("--fresh-label-seeds", action="store_true",
                        help="label here with generation seeds disjoint from labels.jsonl's (offset by "
                             f"{FRESH_LABEL_SEED_OFFSET:,}) and every ordinary caption: a second, independent draw "
                             "of the memorization gates a build was chosen on (SD-like zoo only)")
    parser.add_argument("--disjoint-from", type=int, default=None, metavar="SEED",
                        help="draw the ordinary diversity and fidelity captions from those --sample-seed SEED did "
                             "not draw: a second, disjoint check of gates a build was chosen on")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    if args.sample_seed is not None:
        sizes = dataclasses.replace(sizes, sample_seed=args.sample_seed)
    if args.fresh_label_seeds and args.labels_from_zoo:
        parser.error("--fresh-label-seeds labels here; it cannot be combined with --labels-from-zoo")
    if args.fresh_label_seeds:
        sizes = dataclasses.replace(sizes, generic=None)
    started = time.time()
    seconds: dict[str, float] = {}

    folder = zoo_folder(args.model)
    corpus = zoo_corpus_name(folder)
    args.out = args.out or f"benchmarks/results/zoo_{corpus}_gates.json"
    from_zoo = args.labels_from_zoo or corpus != "sd"
    if args.fresh_label_seeds and from_zoo:
        raise SystemExit(f"zoo_gates: --fresh-label-seeds needs an SD-like zoo; '{args.model}' is a {corpus} zoo")
    items = cast(list[SDItem], load_corpus(folder))  # ZooItems for the collapse zoo: caption, kind, replication
    model = load_model(folder / "pipeline")
    reader = SDAttributeReader.load(folder / "attribute_reader") if corpus == "sd" else None
    seconds["load"] = round(time.time() - started, 1)

    exclude: frozenset[str] = frozenset()
    if args.disjoint_from is not None:
        first = choose(items, dataclasses.replace(sizes, sample_seed=args.disjoint_from))[1]
        exclude = frozenset(it.caption for it in first)
    label_items, ordinary, memorized = choose(items, sizes, exclude)
    cfg = SDLabelConfig(seeds_per_prompt=sizes.label_seeds, num_inference_steps=sizes.steps,
                        null_captions=sizes.null_captions,
                        seed_offset=FRESH_LABEL_SEED_OFFSET if args.fresh_label_seeds else 0)
    t = time.time()
    rows, summary, cfg, label_items = gate_labels(folder, model, items, reader, cfg, label_items, from_zoo)
    seconds["labels"] = round(time.time() - t, 1)

    t = time.time()
    ordinary_ssim, memorized_ssim, fid, reader_ceiling, by_value = diversity_and_fidelity(
        model, reader, ordinary, memorized, cfg, sizes, summary)
    seconds["diversity_and_fidelity"] = round(time.time() - t, 1)

    # the labeller's per-caption false-call rate: verdicts' BH cut, the SD threshold labeller's null quantile; the
    # collapse zoo's threshold labels have none
    null_rate = summary.get("null_rate", 1 - cfg.null_quantile if corpus == "sd" else None)
    gates = sd_gates(rows, ordinary_ssim, memorized_ssim, fid, null_rate)
    seconds["total"] = round(time.time() - started, 1)
    result = {
        "model": str(folder), "corpus": corpus, "fingerprint": model.fingerprint, "smoke": args.smoke,
        "labels_source": "the zoo's labels.jsonl" if from_zoo else "a sample labelled here"
        + (", generation seeds disjoint from labels.jsonl's" if args.fresh_label_seeds else ""),
        "passed": sum(g["pass"] for g in gates.values()), "gates_total": len(gates), "gates": gates,
        "sizes": {**asdict(sizes), "disjoint_from": args.disjoint_from, "labelled_captions": len(label_items),
                  "diversity_captions":
                  {"ordinary": len(ordinary), "memorized": len(memorized)},
                  "generations": len(label_items) * sizes.label_seeds
                  + (len(ordinary) + len(memorized)) * sizes.diversity_seeds},
        "labels": {"by_kind": summary["by_kind"], "by_family": summarise_by_family(rows),
                   "signature_by_replication": summary["signature_by_replication"],
                   "thresholds": summary["thresholds"], "label_fidelity": summary["generic_fidelity"],
                   "labeller": summary.get("labeller", "threshold"), "null_rate": null_rate,
                   "label_config": summary.get("label_config") or dataclasses.asdict(cfg)},
        "diversity": {"ordinary_per_caption": [round(float(v), 4) for v in ordinary_ssim],
                      "memorized_per_caption": [round(float(v), 4) for v in memorized_ssim]},
        "fidelity": {k: round(v, 4) for k, v in fid.items()},
        "fidelity_on_training_renders": None if reader_ceiling is None else
        {k: round(v, 4) for k, v in reader_ceiling.items()},
        "fidelity_by_value": by_value,
        "seconds": seconds,
    }
    atomic_write_text(Path(args.out), portable_json(result))
    for name, g in gates.items():
        print(f"{name:<28} {json.dumps(g['value']):<40} {g['target']:<28} {'pass' if g['pass'] else 'FAIL'}")
    print(f"{result['passed']}/{len(gates)} gates pass; wrote {args.out} in {seconds['total']:.0f} s")


if __name__ == "__main__":
    main()
