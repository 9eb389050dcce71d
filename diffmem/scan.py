"""``diffmem scan``: score every prompt of a set with one or more detectors, resumably.

Prompts are processed in fixed chunks (``batch_size`` prompts of this process's shard); each chunk's
scores are written as one Parquet part atomically, so a killed scan loses at most the chunk in flight
and a rerun of the same command skips finished parts. Once all parts exist they are merged into
``scores.parquet`` (one row per unique prompt, in file order). ``provenance.json`` records the model
fingerprint, the prompt file's hash, every detector's settings, seeds and library versions; a rerun
with other settings into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from diffmem.detectors.base import Detector, NoiseStepDetector, PromptDetector
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_bytes, atomic_write_text
from diffmem.models.model import DiffusionModel
from diffmem.prompts import PromptSet

log = logging.getLogger(__name__)
SCORES_FILE = "scores.parquet"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class ScanSettings:
    """Settings that determine every score (all saved in provenance)."""

    n_draws: int = 8
    seed: int = 0
    batch_size: int = 64
    schedule_steps: int = 50


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import diffmem

    return {"diffmem": diffmem.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _prompt_hash(prompts: PromptSet) -> str:
    h = hashlib.sha256()
    for i, t in zip(prompts.ids, prompts.texts):
        h.update(f"{i}\t{t}\n".encode())
    return h.hexdigest()[:16]


def provenance(model: DiffusionModel, prompts: PromptSet, detectors: list[Detector], settings: ScanSettings,
               world_size: int = 1) -> dict[str, Any]:
    return {
        "model": model.describe(),
        "prompts": {"source": prompts.source, "n_unique": len(prompts), "duplicates_dropped": prompts.duplicates,
                    "sha256_16": _prompt_hash(prompts)},
        "detectors": [d.config() for d in detectors],
        "settings": settings.__dict__,
        "noise_seeds": [settings.seed + j for j in range(settings.n_draws)],
        "world_size": world_size,
        "versions": _versions(),
    }


def _comparable(p: dict) -> dict:
    p = json.loads(json.dumps(p))
    p.pop("versions", None)
    p["model"].pop("device", None)
    return p


def score_chunk(engine: NoiseStepEngine, detectors: list[Detector], texts: list[str]) -> dict[str, np.ndarray]:
    """Scores of every detector for one chunk: noise-step detectors share one engine pass."""
    emb = engine.model.encode_prompts(texts)
    step_dets = [d for d in detectors if isinstance(d, NoiseStepDetector)]
    out: dict[str, np.ndarray] = {}
    if step_dets:
        batch = engine.run(emb, {i for d in step_dets for i in d.timestep_indices()})
        for d in step_dets:
            out[d.name] = d.score_batch(batch).double().cpu().numpy()
    for d in detectors:
        if isinstance(d, PromptDetector):
            out[d.name] = d.score_prompts(engine.model, emb, engine).double().cpu().numpy()
    return out


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
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    prov = provenance(model, prompts, detectors, settings, world_size)
    prov_path = out / PROVENANCE_FILE
    if prov_path.is_file():
        if _comparable(json.loads(prov_path.read_text())) != _comparable(prov):
            raise DiffmemError(f"'{out}' holds a scan with other settings (model, prompts, detectors or seeds); "
                               "use another --out or delete it")
    elif rank == 0:
        atomic_write_text(prov_path, json.dumps(prov, indent=2))

    shard = list(range(rank, len(prompts), world_size))
    chunks = [shard[i : i + settings.batch_size] for i in range(0, len(shard), settings.batch_size)]
    todo = [(k, c) for k, c in enumerate(chunks) if not (parts / f"rank{rank:03d}-{k:06d}.parquet").is_file()]
    engine = NoiseStepEngine(model, settings.n_draws, settings.seed, settings.schedule_steps)
    if todo:
        for d in detectors:
            d.prepare(engine)
    bar = tqdm(total=len(shard), initial=len(shard) - sum(len(c) for _, c in todo), desc=f"scan[{rank}]",
               disable=not progress, dynamic_ncols=True)
    for k, chunk in todo:
        scores = score_chunk(engine, detectors, [prompts.texts[i] for i in chunk])
        table = pa.table({"position": pa.array(chunk, pa.int64()),
                          **{name: pa.array(v, pa.float64()) for name, v in scores.items()}})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(parts / f"rank{rank:03d}-{k:06d}.parquet", sink.getvalue().to_pybytes())
        bar.update(len(chunk))
    bar.close()
    if rank != 0:
        return None
    return merge_parts(out, prompts, names, world_size, settings.batch_size)


def merge_parts(out: Path, prompts: PromptSet, names: list[str], world_size: int, batch_size: int) -> Path | None:
    """Join every shard's parts into ``scores.parquet`` (file order, each prompt exactly once)."""
    expected = sum(math.ceil(len(range(r, len(prompts), world_size)) / batch_size) for r in range(world_size))
    files = sorted((out / "parts").glob("rank*.parquet"))
    if len(files) < expected:
        log.warning("%d of %d parts are written; rerun to finish", len(files), expected)
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("position")
    positions = table.column("position").to_pylist()
    if positions != list(range(len(prompts))):
        raise DiffmemError(f"parts in '{out / 'parts'}' do not cover the prompts exactly once; delete the folder")
    columns: dict[str, Any] = {"id": prompts.ids, "text": prompts.texts}
    for name in names:
        columns[name] = table.column(name)
    for extra, values in prompts.columns.items():
        if extra not in columns and extra not in ("caption", "prompt"):
            columns[f"input_{extra}"] = [None if v is None else str(v) for v in values]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return atomic_write_bytes(out / SCORES_FILE, sink.getvalue().to_pybytes())


def apply_thresholds(scores: pa.Table, thresholds: dict[str, float]) -> pa.Table:
    """Add ``flagged_<detector>`` (score > threshold; null where the score is NaN) and ``flagged`` (any)."""
    any_flag = np.zeros(scores.num_rows, dtype=bool)
    for name, thr in thresholds.items():
        s = scores.column(name).to_numpy(zero_copy_only=False)
        flags = np.where(np.isnan(s), False, s > thr)
        scores = scores.append_column(f"flagged_{name}", pa.array(flags.tolist(), mask=np.isnan(s)))
        any_flag |= flags
    return scores.append_column("flagged", pa.array(any_flag))
