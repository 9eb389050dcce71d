"""``diffmem scan``: score every prompt of a set with one or more detectors, resumably.

Chunks of ``batch_size`` prompts are scored and written as they finish (see :mod:`diffmem.jobs`), then
merged into ``scores.parquet`` (one row per unique prompt, in file order). ``provenance.json``
records the model fingerprint, the prompt file's hash, every detector's settings, seeds and library
versions; a rerun with other settings into the same folder is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffmem.detectors.base import Detector, score_embeddings
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.errors import DiffmemError
from diffmem.jobs import claim_folder, merge_parts, prompt_hash, run_chunks, versions
from diffmem.models.model import DiffusionModel
from diffmem.prompts import PromptSet

log = logging.getLogger(__name__)
SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class ScanSettings:
    """Settings that determine every score (all saved in provenance)."""

    n_draws: int = 8
    seed: int = 0
    batch_size: int = 64
    schedule_steps: int = 50


def provenance(model: DiffusionModel, prompts: PromptSet, detectors: list[Detector], settings: ScanSettings,
               world_size: int = 1) -> dict[str, Any]:
    return {
        "model": model.describe(),
        "prompts": {"source": prompts.source, "n_unique": len(prompts), "duplicates_dropped": prompts.duplicates,
                    "sha256_16": prompt_hash(prompts)},
        "detectors": [d.config() for d in detectors],
        "settings": settings.__dict__,
        "noise_seeds": [settings.seed + j for j in range(settings.n_draws)],
        "world_size": world_size,
        "versions": versions(),
    }


def score_chunk(engine: NoiseStepEngine, detectors: list[Detector], texts: list[str]) -> dict[str, np.ndarray]:
    """Scores of every detector for one chunk: noise-step detectors share one engine pass."""
    scores = score_embeddings(engine, detectors, engine.model.encode_prompts(texts))
    return {name: v.double().cpu().numpy() for name, v in scores.items()}


def run_scan(model: DiffusionModel, prompts: PromptSet, detectors: list[Detector], out_dir: str | Path,
             settings: ScanSettings = ScanSettings(), rank: int = 0, world_size: int = 1,
             progress: bool = True) -> Path | None:
    """Score this process's shard into ``out_dir/parts``; rank 0 merges when every shard is done.

    Returns the merged ``scores.parquet`` path (None on ranks > 0 or while shards are missing).
    """
    if not detectors:
        raise DiffmemError("no detector given; choose at least one with --detector")
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise DiffmemError(f"detector names repeat: {names}")
    out = Path(out_dir)
    claim_folder(out, provenance(model, prompts, detectors, settings, world_size), rank)
    engine = NoiseStepEngine(model, settings.n_draws, settings.seed, settings.schedule_steps)

    def score(chunk: list[int]) -> dict[str, pa.Array]:
        scores = score_chunk(engine, detectors, [prompts.texts[i] for i in chunk])
        return {name: pa.array(v, pa.float64()) for name, v in scores.items()}

    def prepare() -> None:
        for d in detectors:
            d.prepare(engine)

    run_chunks(prompts, out, settings.batch_size, score, rank, world_size, "scan", progress, prepare)
    if rank != 0:
        return None
    return merge_parts(out, prompts, world_size, settings.batch_size, SCORES_FILE)


def apply_thresholds(scores: pa.Table, thresholds: dict[str, float]) -> pa.Table:
    """Add ``flagged_<detector>`` (score > threshold; null where the score is NaN) and ``flagged`` (any)."""
    any_flag = np.zeros(scores.num_rows, dtype=bool)
    for name, thr in thresholds.items():
        s = scores.column(name).to_numpy(zero_copy_only=False)
        flags = np.where(np.isnan(s), False, s > thr)
        scores = scores.append_column(f"flagged_{name}", pa.array(flags.tolist(), mask=np.isnan(s)))
        any_flag |= flags
    return scores.append_column("flagged", pa.array(any_flag))
