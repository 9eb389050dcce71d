"""``diffmem extract``: run extraction attacks on prompts and match what they produce to a training set.

Resumable and incremental like ``scan`` (see :mod:`diffmem.jobs`); the result is
``extraction.parquet`` with one row per prompt and ``<attack>.<column>`` columns, plus
``provenance.json`` (model fingerprint, prompts hash, attack settings, matcher and threshold).
"""

from __future__ import annotations

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


def folder_training_index(folder: Path, matcher: str = "ssim", threshold: float | None = None,
                          size: int = 32) -> TrainingIndex:
    """Every image of ``folder`` (each its own item, numbered in sorted file order)."""
    from diffmem.images import load_image_folder

    images = load_image_folder(folder, size)
    m = make_matcher(matcher).fit(images)
    return TrainingIndex(images, np.arange(len(images)), m, m.default_threshold if threshold is None else threshold)


OWN_ITEM_COLUMN = "own_item"


def own_items_of(prompts: PromptSet) -> list[int | None]:
    """Each prompt's own training item from an ``own_item`` column (empty: none), else ``None`` for all.

    A task that knows the items (the zoo: :func:`diffmem.tasks.zoo.zoo_own_items`) passes them to
    :func:`run_extract` instead."""
    values = prompts.columns.get(OWN_ITEM_COLUMN)
    if values is None:
        return [None] * len(prompts)
    return [None if v is None or str(v).strip() in ("", "None", "nan") else int(v) for v in values]


def run_extract(model: DiffusionModel, prompts: PromptSet, attacks: list[Attack], index: TrainingIndex | None,
                out_dir: str | Path, settings: ExtractSettings = ExtractSettings(), rank: int = 0,
                world_size: int = 1, progress: bool = True, own_items: list[int | None] | None = None
                ) -> Path | None:
    """Run every attack on every chunk; returns ``extraction.parquet`` once complete (rank 0).

    ``own_items``: each prompt's own training item (default: :func:`own_items_of`)."""
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
    own = own_items_of(prompts) if own_items is None else own_items
    if len(own) != len(prompts):
        raise DiffmemError(f"got {len(own)} own items for {len(prompts)} prompts; expected one each")

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
