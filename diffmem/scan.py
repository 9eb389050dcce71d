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
TOKENS_COLUMN = "tokens"  # each prompt's token count before truncation, written with its scores


NOT_SCORES = ("id", "text", "min_p", TOKENS_COLUMN)


def score_columns(table: pa.Table) -> list[str]:
    """The detector-score columns of a scan table (not ids, texts, token counts, flags or input columns)."""
    return [c for c in table.column_names if c not in NOT_SCORES and not c.startswith(("flagged", "input_"))]


def truncation(ids: list[str], tokens: np.ndarray, max_tokens: int) -> dict[str, Any]:
    """Which prompts the model's tokenizer truncates: their count and (the first ``TRUNCATED_LISTED``) ids with
    token counts, so the terminal gets one line, not one per prompt. The counts come from the scan's own
    chunks (each process counts its shard's prompts once, beside their scores), not from a pass over the
    whole list before the scan."""
    over = np.flatnonzero(tokens > max_tokens)
    listed = [{"id": ids[i], "tokens": int(tokens[i])} for i in over[:TRUNCATED_LISTED]]
    return {"max_tokens": max_tokens, "count": int(len(over)), "listed": listed}


def provenance(model: DiffusionModel, prompts: PromptSet, detectors: list[Detector], settings: ScanSettings,
               world_size: int = 1) -> dict[str, Any]:
    return {
        "model": model.describe(),
        "prompts": {"source": prompts.source, "n_unique": len(prompts), "duplicates_dropped": prompts.duplicates,
                    "sha256_16": prompt_hash(prompts)},
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


def record_truncation(out: Path, scores_path: Path, model: DiffusionModel, prompts: PromptSet) -> None:
    """After the merge: add ``prompts.truncated`` to provenance.json (from the table's ``tokens`` column; parts
    written before that column existed are recounted here) and say it in one line."""
    import json

    import pyarrow.parquet as pq

    from diffmem.io import atomic_write_text
    from diffmem.jobs import PROVENANCE_FILE

    names = pq.read_schema(scores_path).names
    tokens = (pq.read_table(scores_path, columns=[TOKENS_COLUMN]).column(TOKENS_COLUMN).to_numpy()
              if TOKENS_COLUMN in names else np.asarray(model.token_counts(prompts.texts)))
    summary = truncation(prompts.ids, tokens, model.max_tokens)
    path = out / PROVENANCE_FILE
    record = json.loads(path.read_text())
    if record["prompts"].get("truncated") != summary:
        record["prompts"]["truncated"] = summary
        atomic_write_text(path, json.dumps(record, indent=2, default=str))
    if summary["count"]:
        log.warning("%d of %d prompts have more than the tokenizer's %d tokens and are scored truncated "
                    "(listed in %s)", summary["count"], len(prompts), model.max_tokens, path)


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
    for d in detectors:
        d.bind(model)
    record = provenance(model, prompts, detectors, settings, world_size)
    claim_folder(out, record, rank)
    engine = NoiseStepEngine(model, settings.n_draws, settings.seed, settings.schedule_steps,
                             seed_per_prompt=settings.seed_per_prompt)

    def score(chunk: list[int]) -> dict[str, pa.Array]:
        texts = [prompts.texts[i] for i in chunk]
        scores = score_chunk(engine, detectors, texts, list(chunk))
        return {**{name: pa.array(v, pa.float64()) for name, v in scores.items()},
                TOKENS_COLUMN: pa.array(model.token_counts(texts), pa.int32())}

    def prepare() -> None:
        for d in detectors:
            d.prepare(engine)

    run_chunks(prompts, out, settings.batch_size, score, rank, world_size, "scan", progress, prepare)
    if rank != 0:
        return None
    return finish_scan(out, model, prompts, world_size, settings.batch_size)


def finish_scan(out: Path, model: DiffusionModel, prompts: PromptSet, world_size: int, batch_size: int
                ) -> Path | None:
    """Merge every shard's parts (rank 0, once all are written) and record which prompts were truncated."""
    path = merge_parts(out, prompts, world_size, batch_size, SCORES_FILE)
    if path is not None:
        record_truncation(out, path, model, prompts)
    return path
