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
VERDICTS_FILE = "verdicts.parquet"
VERDICTS_SUMMARY = "verdicts.json"
NULL_FOLDER = "null"  # the never-trained prompts' run, inside the extraction folder
REPLICATION = "replication"
FAMILY_COLUMN = "family"


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


@dataclass(frozen=True)
class VerdictSettings:
    """How replication verdicts are decided (:mod:`diffmem.eval.verdicts`); saved with them."""

    q: float = 0.05  # Benjamini-Hochberg FDR level
    null_level: float = 0.01  # per-generation tail level of the match threshold
    confidence: float = 0.95  # of the count's lower bound


def replication_similarities(table: pa.Table, column: str = "gen_similarity") -> np.ndarray:
    """A replication run's per-generation column as a ``(prompts, generations)`` array (NaN: not scored)."""
    values = table.column(f"{REPLICATION}.{column}").to_pylist()
    width = max((len(v) for v in values if v is not None), default=0)
    out = np.full((len(values), width), np.nan)
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = np.asarray(v, dtype=np.float64)
    return out


def replication_verdicts(table: pa.Table, null_table: pa.Table, own_items: list[int | None],
                         families: list[str] | None = None, null_families: list[str] | None = None,
                         settings: VerdictSettings = VerdictSettings()) -> tuple[pa.Table, dict]:
    """Per-prompt verdicts from a replication run (``table``) against the same run on never-trained prompts
    (``null_table``): a null per family where both sides name families, else one pooled null.

    Returns the verdict table (one row per prompt: matching generations own/other, replication rate, p, q,
    verdict, margin, matched items, attribution) and a summary (count with its bound, nulls, null checks)."""
    from diffmem.eval.verdicts import attribution, decide, matched_items, trimmed_null

    sim, null_sim = replication_similarities(table), replication_similarities(null_table)
    null_texts = null_table.column("text").to_pylist()
    own_sim = replication_similarities(table, "gen_own_similarity")
    items = np.asarray(table.column(f"{REPLICATION}.gen_item").to_pylist(), dtype=object)
    by_family = families is not None and null_families is not None
    fams = list(families) if by_family else ["all"] * len(sim)
    null_fams = np.asarray(null_families if by_family else ["all"] * len(null_sim))
    missing = sorted(set(fams) - set(null_fams.tolist()))
    if missing:
        raise DiffmemError(f"no never-trained prompts of family {missing} among the null prompts; add some "
                           "or drop the family column to pool one null")
    trimmed = {f: trimmed_null(null_sim[null_fams == f], settings.null_level, settings.q,
                               what=f"null prompts of family '{f}'") for f in sorted(set(fams))}
    nulls = {f: t.null for f, t in trimmed.items()}
    v = decide(sim, [nulls[f] for f in fams], settings.q, settings.confidence)
    tau = np.array([nulls[f].threshold for f in fams])
    own_over = np.where(np.isfinite(own_sim), own_sim, -np.inf) > tau[:, None]
    matched = [matched_items(items[i], sim[i], tau[i]) if v.replicates[i] else [] for i in range(len(sim))]
    out = pa.table({
        "id": table.column("id"), "text": table.column("text"), "family": fams,
        "generations": v.k.tolist(), "matching": v.matches.tolist(),
        "matching_own": [None if np.isnan(own_sim[i]).all() else int(own_over[i].sum()) for i in range(len(sim))],
        "replication_rate": v.replication_rate.tolist(), "p_value": v.p_value.tolist(),
        "q_value": v.q_value.tolist(), "replicates": v.replicates.tolist(), "margin": v.margin.round(6).tolist(),
        "matched_items": matched, "attribution": attribution(matched, own_items)})
    summary = {"count": v.bound.__dict__, "sentence": v.bound.sentence(), "settings": settings.__dict__,
               "nulls": {f: n.describe() for f, n in nulls.items()},
               "null_checks": {f: _null_checks(null_sim[null_fams == f][t.kept], t.null, settings)
                               for f, t in trimmed.items()},
               # never-trained prompts that replicate themselves: left out of the null, and worth a look
               "null_prompts_replicating": {f: [null_texts[i] for i in np.nonzero(null_fams == f)[0][~t.kept]]
                                            for f, t in trimmed.items()},
               "generations_per_prompt": int(np.median(v.k)) if len(v.k) else 0,
               "attribution": {a: int(sum(x == a for x, r in zip(out.column("attribution").to_pylist(),
                                                                  v.replicates) if r))
                               for a in ("own", "other", "both", "unknown")}}
    return out, summary


def _null_checks(null_sim: np.ndarray, null, settings: VerdictSettings) -> dict:
    """Does the binomial null hold for these never-trained prompts? (:mod:`diffmem.eval.verdicts`)"""
    from diffmem.eval.verdicts import null_overdispersion, null_self_check

    out: dict = {"overdispersion": null_overdispersion(null_sim, null)}
    try:
        out["self_check"] = null_self_check(null_sim, settings.null_level, settings.q)
    except DiffmemError as exc:  # too few null generations to split in two
        out["self_check"] = {"skipped": str(exc)}
    return out
