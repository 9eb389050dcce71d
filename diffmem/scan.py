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
    # False: the same n_draws noise draws (seeds seed + j) for every prompt; True: Wen et al.'s convention,
    # prompt i's draws from a generator seeded seed + i (i = its index in the prompt file)
    seed_per_prompt: bool = False


TRUNCATED_LISTED = 10_000  # ids of truncated prompts kept in provenance.json (the count is always exact)


def truncation(model: DiffusionModel, prompts: PromptSet, chunk: int = 4096) -> dict[str, Any]:
    """Which prompts the model's tokenizer truncates: their count and (the first ``TRUNCATED_LISTED``) ids with
    token counts. Computed once per scan for provenance, so the terminal gets one line, not one per prompt."""
    listed, count = [], 0
    for start in range(0, len(prompts), chunk):
        for offset, n in enumerate(model.token_counts(prompts.texts[start : start + chunk])):
            if n > model.max_tokens:
                count += 1
                if len(listed) < TRUNCATED_LISTED:
                    listed.append({"id": prompts.ids[start + offset], "tokens": n})
    return {"max_tokens": model.max_tokens, "count": count, "listed": listed}


def provenance(model: DiffusionModel, prompts: PromptSet, detectors: list[Detector], settings: ScanSettings,
               world_size: int = 1) -> dict[str, Any]:
    return {
        "model": model.describe(),
        "prompts": {"source": prompts.source, "n_unique": len(prompts), "duplicates_dropped": prompts.duplicates,
                    "sha256_16": prompt_hash(prompts), "truncated": truncation(model, prompts)},
        "detectors": [d.config() for d in detectors],
        "settings": settings.__dict__,
        "noise_seeds": (f"per prompt: the first {settings.n_draws} draws of a generator seeded {settings.seed} + the "
                        "prompt's index in the file" if settings.seed_per_prompt
                        else [settings.seed + j for j in range(settings.n_draws)]),
        "world_size": world_size,
        "versions": versions(),
    }


def score_chunk(engine: NoiseStepEngine, detectors: list[Detector], texts: list[str],
                prompt_ids: list[int] | None = None) -> dict[str, np.ndarray]:
    """Scores of every detector for one chunk: noise-step detectors share one engine pass. ``prompt_ids``: the
    prompts' indices in their file, which seed their noise when the engine draws a seed per prompt."""
    scores = score_embeddings(engine, detectors, engine.model.encode_prompts(texts, warn_truncation=False),
                              prompt_ids)
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
    record = provenance(model, prompts, detectors, settings, world_size)
    claim_folder(out, record, rank)
    truncated = record["prompts"]["truncated"]["count"]
    if truncated and rank == 0:
        log.warning("%d of %d prompts have more than the tokenizer's %d tokens and are scored truncated "
                    "(listed in %s)", truncated, len(prompts), model.max_tokens, out / "provenance.json")
    engine = NoiseStepEngine(model, settings.n_draws, settings.seed, settings.schedule_steps,
                             seed_per_prompt=settings.seed_per_prompt)

    def score(chunk: list[int]) -> dict[str, pa.Array]:
        scores = score_chunk(engine, detectors, [prompts.texts[i] for i in chunk], list(chunk))
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
