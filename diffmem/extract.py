"""``diffmem extract``: run extraction attacks on prompts and match what they produce to a training set.

Resumable and incremental like ``scan`` (see :mod:`diffmem.jobs`); the result is
``extraction.parquet`` with one row per prompt and ``<attack>.<column>`` columns, plus
``provenance.json`` (model fingerprint, prompts hash, attack settings, matcher and threshold).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from diffmem.attacks.base import Attack, AttackContext, TrainingIndex
from diffmem.errors import DiffmemError
from diffmem.eval.matching import make_matcher
from diffmem.jobs import claim_folder, merge_parts, prompt_hash, run_chunks, versions
from diffmem.models.model import DiffusionModel
from diffmem.prompts import PromptSet

EXTRACTION_FILE = "extraction.parquet"


@dataclass(frozen=True)
class ExtractSettings:
    seed: int = 0
    batch_size: int = 32
    matcher: str = "ssim"
    threshold: float | None = None


def zoo_training_index(matcher: str = "ssim", threshold: float | None = None) -> TrainingIndex:
    """The zoo's unique training images (through its VAE, see ``ZooTrainingSet``); default SSIM
    threshold = the zoo's scene-family threshold."""
    from diffmem.zoo.load import zoo_training_set
    from diffmem.zoo.paths import zoo_dir

    ts = zoo_training_set()
    images, item_of_image = ts.reference, ts.item_of_image
    m = make_matcher(matcher).fit(images)
    if threshold is None:
        record = json.loads((zoo_dir() / "zoo.json").read_text())
        threshold = record["labels"]["thresholds"]["scene"]["threshold"] if matcher == "ssim" else m.default_threshold
    return TrainingIndex(images, item_of_image, m, float(threshold))


def folder_training_index(folder: Path, matcher: str = "ssim", threshold: float | None = None,
                          size: int = 32) -> TrainingIndex:
    """Every image of ``folder`` (each its own item, numbered in sorted file order)."""
    from diffmem.cli.deepssim_commands import load_image_folder

    images = load_image_folder(folder, size)
    m = make_matcher(matcher).fit(images)
    return TrainingIndex(images, np.arange(len(images)), m, m.default_threshold if threshold is None else threshold)


def own_items_of(prompts: PromptSet) -> list[int | None]:
    """Each prompt's training item, when the prompt set says (the zoo's trained captions)."""
    if "kind" not in prompts.columns:
        return [None] * len(prompts)
    return [int(i) if not str(k).startswith("heldout") else None for i, k in zip(prompts.ids, prompts.columns["kind"])]


def run_extract(model: DiffusionModel, prompts: PromptSet, attacks: list[Attack], index: TrainingIndex | None,
                out_dir: str | Path, settings: ExtractSettings = ExtractSettings(), rank: int = 0,
                world_size: int = 1, progress: bool = True) -> Path | None:
    """Run every attack on every chunk; returns ``extraction.parquet`` once complete (rank 0)."""
    if not attacks:
        raise DiffmemError("no attack given; choose at least one with --attack")
    out = Path(out_dir)
    prov = {"model": model.describe(),
            "prompts": {"source": prompts.source, "n_unique": len(prompts), "sha256_16": prompt_hash(prompts)},
            "attacks": [a.config() for a in attacks], "settings": settings.__dict__,
            "matcher": None if index is None else {"name": index.matcher.name, "threshold": index.threshold,
                                                   "training_images": len(index.images)},
            "versions": versions()}
    claim_folder(out, prov, rank, command="extract")
    own = own_items_of(prompts)

    def score(chunk: list[int]) -> dict[str, pa.Array]:
        ctx = AttackContext(index=index, own_items=[own[i] for i in chunk], seed=settings.seed)
        cols: dict[str, pa.Array] = {}
        for attack in attacks:
            for name, values in attack.run(model, [prompts.texts[i] for i in chunk], ctx).items():
                cols[f"{attack.name}.{name}"] = pa.array(np.asarray(values).tolist())
        return cols

    run_chunks(prompts, out, settings.batch_size, score, rank, world_size, "extract", progress)
    if rank != 0:
        return None
    return merge_parts(out, prompts, world_size, settings.batch_size, EXTRACTION_FILE)
