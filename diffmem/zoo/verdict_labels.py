"""Zoo ground truth as verdicts at a stated FDR: the labeller ``diffmem extract --null-prompts`` uses, run on a
zoo's captions.

Every labelled caption gets ``generations`` samples (the replication attack, :mod:`diffmem.attacks.replication`:
per-seed best match over the zoo's training images through its VAE, the caption's own images always scored).
The per-generation null of each caption family is the model's own generations of that family's never-trained
captions (:data:`NULL_KINDS`: held-out ordinary captions and held-out titles drawn by the same generator as the
trained ones), with more seeds per caption where a family has few (at least ``min_null_generations``). A
caption is *memorized* when its BH q-value over all labelled captions is ``<= q``
(:mod:`diffmem.eval.verdicts`).

The null captions are labelled too (a held-out title that reproduces a training image is what the field calls
a look-alike replication), by cross-fitting: each is judged against a null fitted on the other never-trained
captions of its family (leave one caption out), so no caption is part of its own null. Null captions
that replicate are left out of their family's null (:func:`~diffmem.eval.verdicts.trimmed_null`): the null is
what never-trained captions draw when they do *not* copy.

Nothing is written into the zoo: rows and summary go to ``out_dir`` (with the resumable generation runs under
``out_dir/runs``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from diffmem.attacks.replication import Replication
from diffmem.eval.verdicts import (
    attribution,
    bh_q_values,
    count_bound,
    fit_generation_null,
    matched_items,
    null_overdispersion,
    prompt_tests,
    trimmed_null,
)
from diffmem.extract import ExtractSettings, replication_similarities, run_extract
from diffmem.models.model import DiffusionModel
from diffmem.tasks.zoo import zoo_own_items

# never-trained captions drawn like the trained ones of their family (not the template look-alikes, which
# are built to resemble a trained template)
NULL_KINDS = ("heldout_generic", "heldout_signature")
REPLICATION_BANDS = ("0", "(0, 0.25)", "[0.25, 0.75)", ">= 0.75")


def replication_band(rate: float) -> str:
    """The band of a caption's replication rate (share of its generations matching a training image)."""
    return REPLICATION_BANDS[0 if rate <= 0 else 1 if rate < 0.25 else 2 if rate < 0.75 else 3]


@dataclass(frozen=True)
class ZooVerdictConfig:
    """How a zoo is labelled by verdicts; saved with the labels."""

    generations: int = 16
    steps: int = 25  # DDIM steps of each generation, CFG 7.5: the replication attack's defaults
    min_null_generations: int = 800
    titles: int = 1000
    title_steps: tuple[int, ...] = (300,)  # titles are generated in nested steps (see ``tested_groups``)
    title_seed: int = 0
    q: float = 0.05
    null_level: float = 0.01
    seed: int = 0
    batch_size: int = 32


def corpus_rows(folder: str | Path) -> list[dict]:
    """A zoo's captions as label rows (item_id, caption, kind, family, replication, group), from its manifest:
    what the labeller needs, with no earlier labels. Family: the SD-like corpus names one per caption; the
    collapse corpus's captions are single objects or scenes (:func:`~diffmem.tasks.zoo.caption_family`), whose
    never-trained captions (held-out ordinary captions, held-out scenes) are each family's null."""
    from diffmem.tasks.zoo import caption_family
    from diffmem.zoo.load import load_corpus

    return [{"item_id": it.item_id, "caption": it.caption, "kind": it.kind, "replication": it.replication,
             "family": getattr(it, "family", None) or caption_family(it.caption), "group": getattr(it, "group", -1)}
            for it in load_corpus(folder)]


def labeller_index(folder: str | Path):
    """The zoo's training index as the labeller uses it: SSIM, at the matcher's default threshold. The verdicts never
    read the index threshold (only the replication attack's quick-look ``flagged`` column does); taking it from the
    zoo's labels would make the labeller's resumable runs depend on the labels they produce."""
    from diffmem.eval.matching import make_matcher
    from diffmem.tasks.zoo import zoo_training_index

    return zoo_training_index("ssim", threshold=make_matcher("ssim").default_threshold, zoo=folder)


def labels_record(summary: dict) -> dict:
    """The ``labels`` record of a zoo's ``zoo.json`` for verdict labels: the summary, the labeller's name and
    config, and each family's null threshold under ``thresholds`` (where readers of a zoo's per-family match
    threshold find it, e.g. :func:`~diffmem.tasks.zoo.zoo_training_index`)."""
    return {"labeller": "verdicts", **summary, "label_config": summary["config"],
            "thresholds": {fam: dict(null) for fam, null in summary["nulls"].items()}}


def select_rows(rows: list[dict], titles: int, seed: int) -> list[dict]:
    """Every caption except once-seen titles (kind ``title``), of which a fixed random ``titles``."""
    once = [r["item_id"] for r in rows if r["kind"] == "title"]
    keep = {once[i] for i in np.random.default_rng(seed).permutation(len(once))[:titles]}
    return [r for r in rows if r["kind"] != "title" or r["item_id"] in keep]


def tested_groups(rows: list[dict], titles: int, steps: tuple[int, ...], seed: int) -> list[tuple[str, list[dict]]]:
    """The tested (non-null) captions of a run with ``titles`` once-seen titles, cut into nested generation runs:
    ``tested`` holds every other caption and the first ``steps[0]`` titles of the fixed permutation, and each
    further run the titles between two steps. A run with more titles therefore extends a smaller one and
    reuses its generations (each caption's seeds depend on the caption only, :mod:`diffmem.attacks.replication`)."""
    bounds = sorted({s for s in steps if 0 < s < titles} | {titles})
    first = [r for r in select_rows(rows, bounds[0], seed) if r["kind"] not in NULL_KINDS]
    groups = [("tested", first)]
    for lo, hi in zip(bounds, bounds[1:]):
        lower = {r["item_id"] for r in select_rows(rows, lo, seed) if r["kind"] == "title"}
        extra = [r for r in select_rows(rows, hi, seed) if r["kind"] == "title" and r["item_id"] not in lower]
        groups.append((f"tested-titles-{lo}-{hi}", extra))
    return groups


def _prompt_set(rows: list[dict], source: str):
    from diffmem.eval.protocol import labelled_prompts

    return labelled_prompts([dict(r, memorized=bool(r.get("memorized", False))) for r in rows], source=source)


def _run(model, rows, k, index, folder: Path, cfg: ZooVerdictConfig, progress: bool, own: bool) -> pa.Table:
    import pyarrow.parquet as pq

    prompts = _prompt_set(rows, f"zoo-verdicts:{folder.name}")
    path = run_extract(model, prompts, [Replication(generations=k, steps=cfg.steps)], index, folder,
                       ExtractSettings(seed=cfg.seed, batch_size=cfg.batch_size), progress=progress,
                       own_items=zoo_own_items(prompts) if own else [None] * len(prompts))
    return pq.read_table(path)


def label_zoo_by_verdicts(model: DiffusionModel, rows: list[dict], index, out_dir: str | Path,
                          cfg: ZooVerdictConfig = ZooVerdictConfig(), progress: bool = True
                          ) -> tuple[list[dict], dict]:
    """Label ``rows`` (a zoo's ``labels.jsonl`` rows: item_id, caption, kind, family, replication) by verdicts
    against ``index`` (the zoo's training index). Returns (label rows, summary)."""
    out = Path(out_dir)
    groups = tested_groups(rows, cfg.titles, cfg.title_steps, cfg.title_seed)
    tested = [r for _, members in groups for r in members]
    null_rows = [r for r in rows if r["kind"] in NULL_KINDS]
    families = sorted({r["family"] for r in tested})
    k = cfg.generations

    tested_run = pa.concat_tables([_run(model, members, k, index, out / "runs" / name, cfg, progress, True)
                                   for name, members in groups if members])
    tested_sim = replication_similarities(tested_run)
    null_sim: dict[str, np.ndarray] = {}
    null_items: dict[str, list] = {}
    null_by_fam: dict[str, list[dict]] = {}
    for fam in families:
        members = [r for r in null_rows if r["family"] == fam]
        if not members:
            raise ValueError(f"family '{fam}' has no never-trained captions ({', '.join(NULL_KINDS)}) for a null")
        g = max(k, math.ceil(cfg.min_null_generations / len(members)))
        run = _run(model, members, g, index, out / "runs" / f"null-{fam}", cfg, progress, False)
        null_sim[fam], null_items[fam] = replication_similarities(run), run.column("replication.gen_item").to_pylist()
        null_by_fam[fam] = members

    # each family's null, trimmed of never-trained captions that replicate themselves; every never-trained caption
    # is judged by cross-fitting (its first k seeds against the other kept captions of its family)
    trimmed = {f: trimmed_null(null_sim[f], cfg.null_level, cfg.q, k, what=f"never-trained captions of family '{f}'")
               for f in families}
    nulls = {f: t.null for f, t in trimmed.items()}
    tests = prompt_tests(tested_sim, [nulls[r["family"]] for r in tested])
    null_tests = [(f, i) for f in families for i in range(len(null_by_fam[f]))]

    all_rows = tested + [null_by_fam[f][i] for f, i in null_tests]
    p = np.concatenate([tests.p_value, [trimmed[f].crossfit.p_value[i] for f, i in null_tests]])
    qv = bh_q_values(p)
    bound = count_bound(p, cfg.q)
    tested_items = tested_run.column("replication.gen_item").to_pylist()
    own_items = zoo_own_items(_prompt_set(all_rows, "zoo-verdicts"))  # trained captions own their item
    labels = []
    for i, r in enumerate(all_rows):
        if i < len(tested):
            t, j, sims, items = tests, i, tested_sim[i], tested_items[i]
        else:
            f, j = null_tests[i - len(tested)]
            t, sims, items = trimmed[f].crossfit, null_sim[f][j, :k], null_items[f][j][:k]
        memorized = bool(qv[i] <= cfg.q)
        matched = matched_items(items, sims, nulls[r["family"]].threshold) if memorized else []
        labels.append({
            "item_id": r["item_id"], "caption": r["caption"], "kind": r["kind"], "family": r["family"],
            "replication": r.get("replication"), "group": r.get("group", -1), "memorized": memorized,
            "replication_rate": round(float(t.replication_rate[j]), 4), "matching": int(t.matches[j]),
            "generations": int(t.k[j]), "p_value": float(p[i]), "q_value": float(qv[i]),
            "margin": round(float(t.margin[j]), 4), "matched_items": matched,
            "match": attribution([matched], [own_items[i]])[0],
            "null_role": "cross-fit" if i >= len(tested) else "tested"})
    labels.sort(key=lambda r: r["item_id"])
    summary = summarise_verdict_labels(labels, cfg)
    summary["count"] = asdict(bound)
    summary["sentence"] = bound.sentence().replace("prompts", "captions")
    summary["nulls"] = {f: {**t.null.describe(), "captions": len(null_by_fam[f]), "captions_kept": int(t.kept.sum()),
                            "threshold_untrimmed": round(fit_generation_null(null_sim[f], cfg.null_level).threshold, 6),
                            "trimmed": [null_by_fam[f][i]["caption"] for i in np.nonzero(~t.kept)[0]],
                            "rounds": t.iterations,
                            "overdispersion": null_overdispersion(null_sim[f][t.kept], t.null)}
                        for f, t in trimmed.items()}
    return labels, summary


def summarise_verdict_labels(labels: list[dict], cfg: ZooVerdictConfig) -> dict:
    """Memorized share per kind, per signature replication count and per replication-rate band."""
    def share(sel: list[dict]) -> dict:
        return {"n": len(sel), "memorized": int(sum(r["memorized"] for r in sel)),
                "share": round(float(np.mean([r["memorized"] for r in sel])), 4) if sel else None}

    kinds = sorted({r["kind"] for r in labels})
    sig = [r for r in labels if r["kind"] == "signature"]
    bands = {b: share([r for r in labels if replication_band(r["replication_rate"]) == b])
             for b in REPLICATION_BANDS}
    return {"config": asdict(cfg), "by_kind": {k: share([r for r in labels if r["kind"] == k]) for k in kinds},
            "signature_by_replication": {str(n): share([r for r in sig if r["replication"] == n])
                                         for n in sorted({r["replication"] for r in sig})},
            "by_replication_band": bands, "n_captions": len(labels),
            "n_memorized": int(sum(r["memorized"] for r in labels))}
