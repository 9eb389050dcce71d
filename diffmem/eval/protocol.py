"""The held-out detection protocol: choose on a development split of the captions, report on a test split.

A detection benchmark makes choices by looking at labels: which draw count of a detector, which step of
``nn-margin``, which members a combination gets, which threshold flags a prompt, which detector is "the
best". Figures measured on the captions those choices were made on are optimistic, so (issue #11):

- :func:`split_captions` cuts the labelled captions into disjoint *dev* and *test* halves, by caption,
  stratified by (kind, label), from a seed: the same captions and seed always give the same split,
  whatever the row order, and each kind keeps its share of memorized and ordinary captions in both;
- every choice is made on dev only (:func:`choose_on_dev`, :func:`choose_combination`,
  :func:`dev_threshold`), and :func:`evaluate_split` reports every figure on test, with the test
  negatives also taken apart by the caller's groups of kinds (``negative_groups``; a zoo's are
  :data:`diffmem.zoo.prompts.NEGATIVE_GROUPS`: ordinary captions, once-seen titles);
- :func:`over_split_seeds` repeats that for several split seeds and gives the spread, since a choice made
  on a small dev split can flip with the seed.

Scores are computed once per prompt (a prompt's score does not depend on the split), so resplitting
costs no model call. The functions take plain arrays, so ``bench`` or a notebook can reuse them on any
scores table.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DiffmemError
from diffmem.eval.detection import detection_metrics, threshold_at_fpr
from diffmem.prompts import PromptSet

# negatives reported apart: group name -> the kinds of the labels file in it (None: every negative kind)
NegativeGroups = Mapping[str, "tuple[str, ...] | None"]
ALL_NEGATIVES: NegativeGroups = {"all": None}
# detectors that compare generations with the training images (a model owner's audit, not a noise-step scan)
TRAINING_IMAGE_DETECTORS = frozenset({"nn-ratio", "nn-margin", "deepssim-train"})
TPR_KEY = "tpr@0.01fpr"
ESTIMATORS = ("strict", "closest")


# ---------------------------------------------------------------------------------------------- labels


def read_labels(path: str | Path) -> list[dict]:
    """Rows of a labels file (JSON lines with at least ``caption``, ``kind``, ``memorized``)."""
    path = Path(path)
    if not path.is_file():
        raise DiffmemError(f"no labels file at '{path}'")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    missing = sorted({k for r in rows for k in ("caption", "kind", "memorized") if k not in r})
    if missing:
        raise DiffmemError(f"labels file '{path}' lacks column(s) {missing}")
    return rows


def labelled_prompts(rows: Sequence[dict], max_negatives_per_kind: int | None = None,
                     exclude: Iterable[str] = (), source: str = "labels") -> PromptSet:
    """The labelled captions as a prompt set (columns kind, replication, memorized, family, memorized_seeds).

    With ``max_negatives_per_kind``: every memorized caption and, per kind, at most that many evenly
    spaced non-memorized ones, so a kind with 16,000 once-seen titles does not drown the others. Ids are
    ``item_id`` where the file has it, else the row number. Captions in ``exclude`` (the reference
    prompts a calibrated detector standardises on) are left out. On the collapse zoo's labels this is
    the prompt set of :func:`diffmem.zoo.prompts.zoo_prompts` (tested), for any labels file.
    """
    excluded = set(exclude)
    rows = [dict(r, item_id=r.get("item_id", i)) for i, r in enumerate(rows)]
    rows = [r for r in rows if r["caption"] not in excluded]
    if max_negatives_per_kind is not None:
        chosen = {r["item_id"] for r in rows if r["memorized"]}
        for kind in sorted({r["kind"] for r in rows}):
            negatives = [r for r in rows if r["kind"] == kind and not r["memorized"]]
            step = max(1, -(-len(negatives) // max_negatives_per_kind))
            chosen |= {r["item_id"] for r in negatives[::step][:max_negatives_per_kind]}
        rows = [r for r in rows if r["item_id"] in chosen]
    return PromptSet(ids=[str(r["item_id"]) for r in rows], texts=[r["caption"] for r in rows], source=source,
                     columns={"kind": [r["kind"] for r in rows], "replication": [r.get("replication") for r in rows],
                              "memorized": [bool(r["memorized"]) for r in rows],
                              "family": [r.get("family", r["kind"]) for r in rows],
                              # how many of the caption's labelling seeds reproduced a training image (labels
                              # written before the field: its memorized seeds unknown, None)
                              "memorized_seeds": [r.get("memorized_seeds") for r in rows]})


def reference_captions(rows: Sequence[dict], kinds: Sequence[str], n: int = 200, every: int = 5) -> list[str]:
    """Ordinary reference captions: every ``every``-th non-memorized caption of each of ``kinds``, alternating
    between the kinds, first ``n``. Chosen by label but not by any score: they calibrate
    ``anisotropy-calibrated`` and ``combined`` and are left out of both splits. A zoo's default reference prompts
    (:func:`diffmem.zoo.prompts.zoo_reference_prompts`) are these with its ordinary kinds."""
    per_kind = [[r["caption"] for r in rows if r["kind"] == kind and not r["memorized"]][::every] for kind in kinds]
    mixed = [c for group in itertools.zip_longest(*per_kind) for c in group if c is not None]
    return mixed[:n]


# ----------------------------------------------------------------------------------------------- split


def _caption_digest(texts: Iterable[str]) -> str:
    """sha256 (first 16 hex digits) of the sorted captions, one per line: names a split's members."""
    return hashlib.sha256("\n".join(sorted(texts)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CaptionSplit:
    """A dev / test split of a prompt list: ``dev[i]`` says whether prompt i is in dev (else test)."""

    seed: int
    dev_fraction: float
    dev: np.ndarray  # (N,) bool
    strata: tuple[str, ...]  # (N,) each prompt's stratum, "kind/memorized" or "kind/not"

    @property
    def test(self) -> np.ndarray:
        return ~self.dev

    def describe(self, ids: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
        """What the JSON records: seed, sizes per stratum, a digest of each side's captions and the test ids
        (a reader can rebuild the split from them, or recompute it from the seed)."""
        strata = np.array(self.strata)
        return {"seed": self.seed, "dev_fraction": self.dev_fraction, "stratified_by": ["kind", "memorized"],
                "n_dev": int(self.dev.sum()), "n_test": int(self.test.sum()),
                "strata": {s: {side: int((mask & (strata == s)).sum()) for side, mask in (("dev", self.dev),
                                                                                            ("test", self.test))}
                           for s in sorted(set(self.strata))},
                "dev_captions_sha256_16": _caption_digest(t for t, d in zip(texts, self.dev) if d),
                "test_captions_sha256_16": _caption_digest(t for t, d in zip(texts, self.dev) if not d),
                "test_ids": [i for i, d in zip(ids, self.dev) if not d]}


def strata_of(kinds: Sequence[str], labels: Sequence[bool]) -> list[str]:
    """Each caption's stratum: its kind and label (``generic/not``, ``signature/memorized``)."""
    return [f"{k}/{'memorized' if y else 'not'}" for k, y in zip(kinds, labels)]


def split_captions(texts: Sequence[str], strata: Sequence[str], seed: int, dev_fraction: float = 0.5) -> CaptionSplit:
    """A deterministic dev / test split by caption, stratified.

    Within each stratum the captions are ordered by ``sha256(f"{seed}:{caption}")`` and the first
    ``floor(n * dev_fraction + 0.5)`` go to dev: a caption's side depends only on the seed, its stratum and
    the other captions of its stratum, never on the row order of the file, and the two sides are disjoint
    by construction (a caption is one prompt: duplicates are refused).
    """
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    if len(set(texts)) != len(texts):
        raise DiffmemError("split_captions needs unique captions (a caption must not sit on both sides)")
    if len(strata) != len(texts):
        raise ValueError(f"{len(texts)} captions but {len(strata)} strata")
    dev = np.zeros(len(texts), dtype=bool)
    for stratum in sorted(set(strata)):
        members = [i for i, s in enumerate(strata) if s == stratum]
        members.sort(key=lambda i: hashlib.sha256(f"{seed}:{texts[i]}".encode()).hexdigest())
        dev[members[: int(np.floor(len(members) * dev_fraction + 0.5))]] = True
    return CaptionSplit(seed, dev_fraction, dev, tuple(strata))


# --------------------------------------------------------------------------------------------- metrics


def metrics_or_none(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """:func:`detection_metrics`, or the counts and why not where a subset lacks positives or negatives
    (a small split of a small kind), so one empty cell does not stop a whole report."""
    labels = np.asarray(labels, dtype=bool)
    try:
        return detection_metrics(labels, scores)
    except DiffmemError as exc:
        return {"auroc": None, "n_pos": int(labels.sum()), "n_neg": int((~labels).sum()), "undefined": str(exc)}


def dev_key(m: Mapping[str, Any]) -> tuple[float, float]:
    """How dev ranks detectors: AUROC, then TPR@1%FPR (strict, Wen's estimator); undefined ranks last."""
    if m.get("auroc") is None:
        return (-np.inf, -np.inf)
    return (m["auroc"], m[TPR_KEY]["strict"])


@dataclass(frozen=True)
class Choice:
    """A choice made on dev: the chosen name, and every candidate's dev AUROC / TPR it was chosen among."""

    name: str
    ranking: dict[str, list[float | None]]  # candidate -> [dev AUROC, dev TPR@1%FPR strict]
    members: tuple[str, ...] = ()  # for a combination

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"chosen": self.name, "dev_ranking": self.ranking}
        if self.members:
            out["members"] = list(self.members)
        return out


def _ranking(dev_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float | None]]:
    return {k: [m.get("auroc"), m[TPR_KEY]["strict"] if m.get("auroc") is not None else None]
            for k, m in dev_metrics.items()}


def choose_on_dev(scores: Mapping[str, np.ndarray], labels: np.ndarray, dev: np.ndarray,
                  candidates: Iterable[str] | None = None, cost: Mapping[str, float] | None = None) -> Choice:
    """The candidate with the best :func:`dev_key` on the dev rows alone; ties go to the fewer UNet calls
    (``cost``), then to the earlier candidate. The test rows are never read."""
    names = list(scores if candidates is None else candidates)
    if not names:
        raise DiffmemError("choose_on_dev: no candidates")
    labels, dev = np.asarray(labels, dtype=bool), np.asarray(dev, dtype=bool)
    dev_metrics = {k: metrics_or_none(labels[dev], np.asarray(scores[k])[dev]) for k in names}
    cost = cost or {}
    best = max(names, key=lambda k: (*dev_key(dev_metrics[k]), -cost.get(k, 0.0), -names.index(k)))
    return Choice(best, _ranking(dev_metrics))


def z_combine(member_scores: Mapping[str, np.ndarray], stats: Mapping[str, Sequence[float]],
              members: Sequence[str]) -> np.ndarray:
    """The ``combined`` detector's score of ``members`` from stored member scores and reference statistics
    (the detector's own :meth:`~diffmem.detectors.combined.Combined.combine`, so the definition is one)."""
    from diffmem.detectors import make_detector

    combined = make_detector("combined", members=list(members), stats={m: list(stats[m]) for m in members})
    return combined.combine({m: member_scores[m] for m in members}).numpy()


def choose_combination(member_scores: Mapping[str, np.ndarray], stats: Mapping[str, Sequence[float]],
                       labels: np.ndarray, dev: np.ndarray, sizes: Sequence[int] = (2, 3),
                       cost: Callable[[tuple[str, ...]], float] | None = None,
                       max_cost: float | None = None) -> Choice:
    """The members of a z-score combination chosen on dev: every subset of the candidates (sizes ``sizes``,
    cost at most ``max_cost`` UNet calls per prompt) is scored with :func:`z_combine` and ranked on dev."""
    subsets = [s for n in sizes for s in itertools.combinations(member_scores, n)
               if max_cost is None or cost is None or cost(s) <= max_cost]
    if not subsets:
        raise DiffmemError("choose_combination: no subset of the members fits the size and cost limits")
    scores = {" + ".join(s): z_combine(member_scores, stats, s) for s in subsets}
    costs = {" + ".join(s): cost(s) for s in subsets} if cost else None
    choice = choose_on_dev(scores, labels, dev, cost=costs)
    return Choice(choice.name, choice.ranking, members=tuple(choice.name.split(" + ")))


def dev_threshold(labels: np.ndarray, scores: np.ndarray, split: CaptionSplit, fpr: float = 0.01) -> dict[str, Any]:
    """A flagging threshold set on dev negatives at ``fpr`` (:func:`threshold_at_fpr`), and the FPR and TPR it
    gives on test: what an auditor who calibrated on dev would see on new captions."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    dev_neg = split.dev & ~labels
    if not dev_neg.any():
        return {"threshold": None, "undefined": "no dev negatives"}
    t = threshold_at_fpr(scores[dev_neg], fpr)
    flagged = scores > t
    test_neg, test_pos = split.test & ~labels, split.test & labels
    return {"target_fpr": fpr, "threshold": t,
            "test_fpr": float(flagged[test_neg].mean()) if test_neg.any() else None,
            "test_tpr": float(flagged[test_pos].mean()) if test_pos.any() else None}


def by_negative_group(labels: np.ndarray, scores: np.ndarray, kinds: Sequence[str], rows: np.ndarray,
                      groups: NegativeGroups = ALL_NEGATIVES) -> dict[str, dict]:
    """Metrics of every positive of ``rows`` against each group's negatives of ``rows`` alone, with the
    group's negative count per kind (a group the labels lack has ``n_neg`` 0 and no metrics)."""
    labels, kinds_arr = np.asarray(labels, dtype=bool), np.asarray(kinds)
    out = {}
    for group, group_kinds in groups.items():
        in_group = np.ones(len(labels), bool) if group_kinds is None else np.isin(kinds_arr, group_kinds)
        neg = rows & ~labels & in_group
        sel = (rows & labels) | neg
        out[group] = {"kinds": sorted(set(kinds_arr[neg].tolist())), "n_neg": int(neg.sum()),
                      "n_neg_by_kind": {k: int((neg & (kinds_arr == k)).sum()) for k in sorted(set(kinds_arr[neg]))},
                      "metrics": metrics_or_none(labels[sel], np.asarray(scores)[sel]) if neg.any() else None}
    return out


# ---------------------------------------------------------------------------------------------- report


def uses_training_images(config: Mapping[str, Any]) -> bool:
    """Whether a detector (by its ``config()``) compares generations with training images, itself or
    through a combination's members."""
    return config.get("name") in TRAINING_IMAGE_DETECTORS or any(
        m in TRAINING_IMAGE_DETECTORS for m in config.get("members", ()))


@dataclass(frozen=True)
class Target:
    """Issue #11's target on the test split: AUROC and TPR@1%FPR, for a detector that needs no training
    images and costs at most ``max_unet_calls`` UNet calls per prompt."""

    auroc: float = 0.99
    tpr: float = 0.9
    max_unet_calls: float = 32.0

    def eligible(self, entry: Entry) -> bool:
        return not entry.training_images and entry.unet_calls <= self.max_unet_calls

    def meets(self, m: Mapping[str, Any]) -> dict[str, bool]:
        """Met or not, with each TPR estimator (``strict`` is Wen et al.'s, the headline)."""
        if m.get("auroc") is None:
            return {e: False for e in ESTIMATORS}
        return {e: bool(m["auroc"] >= self.auroc and m[TPR_KEY][e] >= self.tpr) for e in ESTIMATORS}

    def describe(self) -> dict[str, Any]:
        return {"auroc": self.auroc, "tpr@0.01fpr": self.tpr, "max_unet_calls_per_prompt": self.max_unet_calls,
                "training_images": False, "split": "test"}


@dataclass(frozen=True)
class Entry:
    """One detector's per-prompt scores and what the report needs to know about it.

    ``variant_of`` groups the settings of one detector that a benchmark scanned (noise-norm at 8 and 32
    draws, nn-margin at several steps): one variant per group is chosen on dev.
    """

    name: str
    scores: np.ndarray
    unet_calls: float
    training_images: bool = False
    variant_of: str | None = None


@dataclass
class CombinationSpace:
    """The candidates a dev-chosen combination picks its members from: their scores and reference stats."""

    member_scores: dict[str, np.ndarray]
    stats: dict[str, list[float]]
    cost: Callable[[tuple[str, ...]], float] | None = None
    max_cost: float | None = None
    sizes: tuple[int, ...] = (2, 3)
    display: dict[str, str] = field(default_factory=dict)  # member -> its entry's name in the report


def evaluate_split(entries: Sequence[Entry], labels: np.ndarray, kinds: Sequence[str], split: CaptionSplit,
                   target: Target = Target(), combinations: CombinationSpace | None = None,
                   negative_groups: NegativeGroups = ALL_NEGATIVES) -> dict[str, Any]:
    """Every figure of one split seed: choices on dev, figures on test.

    Per detector: dev and test metrics, test metrics per group of ``negative_groups``, the dev-set threshold's test
    rates, eligibility for and meeting of the target. Chosen on dev: one variant per ``variant_of`` group,
    the combination's members (with ``combinations``, added as an entry), and the best eligible detector
    (the target's headline), each reported with its test figures. The split itself is the caller's to
    record (:meth:`CaptionSplit.describe` needs the prompt ids and captions).
    """
    labels = np.asarray(labels, dtype=bool)
    entries = list(entries)
    choices: dict[str, Any] = {}
    if combinations is not None:
        combo = choose_combination(combinations.member_scores, combinations.stats, labels, split.dev,
                                   combinations.sizes, combinations.cost, combinations.max_cost)
        members = [combinations.display.get(m, m) for m in combo.members]
        name = f"combined, chosen on dev ({' + '.join(members)})"
        entries.append(Entry(name, z_combine(combinations.member_scores, combinations.stats, combo.members),
                             combinations.cost(combo.members) if combinations.cost else float("nan"),
                             uses_training_images({"name": "combined", "members": combo.members})))
        choices["combination"] = {**combo.describe(), "entry": name,
                                  "stats": {m: combinations.stats[m] for m in combo.members}}
    detectors = {}
    for e in entries:
        detectors[e.name] = {
            "dev": metrics_or_none(labels[split.dev], e.scores[split.dev]),
            "test": metrics_or_none(labels[split.test], e.scores[split.test]),
            "test_by_negatives": by_negative_group(labels, e.scores, kinds, split.test, negative_groups),
            "dev_threshold_at_1%fpr": dev_threshold(labels, e.scores, split),
            "unet_calls_per_prompt": e.unet_calls, "training_images": e.training_images,
            "eligible_for_target": target.eligible(e)}
        detectors[e.name]["meets_target"] = target.meets(detectors[e.name]["test"])
    scores = {e.name: e.scores for e in entries}
    cost = {e.name: e.unet_calls for e in entries}
    variants = {}
    for group in sorted({e.variant_of for e in entries if e.variant_of}):
        names = [e.name for e in entries if e.variant_of == group]
        if len(names) < 2:
            continue  # one setting scanned: nothing to choose
        variants[group] = choose_on_dev(scores, labels, split.dev, names, cost).describe()
    choices["variants"] = variants
    eligible = [e.name for e in entries if target.eligible(e)]
    if eligible:
        best = choose_on_dev(scores, labels, split.dev, eligible, cost)
        choices["best_noise_step"] = {**best.describe(), "test": detectors[best.name]["test"],
                                      "meets_target": detectors[best.name]["meets_target"]}
    return {"detectors": detectors, "chosen_on_dev": choices}


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
            "spread": float(max(values) - min(values)), "n_seeds": len(values)}


def over_split_seeds(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, min, max and spread over split seeds of each detector's test AUROC and TPR@1%FPR (both
    estimators), and of the dev-chosen best noise-step detector (which may differ per seed)."""
    def figures(m: Mapping[str, Any] | None) -> dict[str, float | None]:
        ok = m is not None and m.get("auroc") is not None
        return {"auroc": m["auroc"] if ok else None,
                **{f"tpr@1%fpr {e}": m[TPR_KEY][e] if ok else None for e in ESTIMATORS}}

    names = [n for n in next(iter(reports.values()))["detectors"] if all(n in r["detectors"] for r in reports.values())]
    out: dict[str, Any] = {"split_seeds": sorted(reports), "detectors": {}}
    for name in names:
        per_seed = [figures(r["detectors"][name]["test"]) for r in reports.values()]
        out["detectors"][name] = {k: _spread([p[k] for p in per_seed]) for k in per_seed[0]}
    best = [r["chosen_on_dev"].get("best_noise_step") for r in reports.values()]
    if all(best):
        per_seed = [figures(b["test"]) for b in best]
        out["best_noise_step"] = {"chosen": {str(s): b["chosen"] for s, b in zip(reports, best)},
                                  "meets_target": {str(s): b["meets_target"] for s, b in zip(reports, best)},
                                  **{k: _spread([p[k] for p in per_seed]) for k in per_seed[0]}}
    return out


def confirmed_or_negative(prompts: PromptSet, positive_kinds: Sequence[str] | None, min_seeds: int) -> list[int]:
    """Indices of the prompts a view keeps: every non-memorized caption, and the memorized ones of
    ``positive_kinds`` (None: any kind) reproduced in at least ``min_seeds`` labelling seeds; a label written
    without per-seed counts fails any ``min_seeds`` above 1 (it cannot show it is met)."""
    memorized, kind = prompts.columns["memorized"], prompts.columns["kind"]
    seeds = prompts.columns.get("memorized_seeds", [None] * len(prompts))

    def confirmed(i: int) -> bool:
        kind_ok = positive_kinds is None or kind[i] in positive_kinds
        return kind_ok and (min_seeds <= 1 or (seeds[i] is not None and seeds[i] >= min_seeds))

    return [i for i in range(len(prompts)) if not memorized[i] or confirmed(i)]
