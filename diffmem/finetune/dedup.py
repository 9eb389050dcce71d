"""Deduplicating a fine-tuning set before training: duplicated image-caption pairs are what gets memorized
(Somepalli et al. 2023; Carlini et al. 2023; Webster 2023), so removing them is the first training-time
mitigation.

- **exact**: identical pixels at the training resolution (the same file saved twice, or re-encoded losslessly);
- **near**: exact copies, images within a pixel RMS distance of 0.01 (re-encoded), and perceptual-hash
  neighbours: hashes (``imagehash.phash``, 64-bit DCT hash, Zauner 2010) differing in at most ``max_distance``
  bits (resized, slightly shifted or recoloured copies). Different pictures are checked not to merge at the
  default of 4 bits in ``tests/test_finetune.py``.

The grouping is the training index's (:func:`diffmem.eval.matching.duplicate_groups`, union-find). Each group
keeps its first image in file order, and the captions of the images it drops move to the kept image (no caption
is lost: with the multi-caption mitigation on, training draws among them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffmem.eval.matching import NEAR_DUPLICATE_RMS, duplicate_groups
from diffmem.finetune.dataset import FinetuneSet

DEDUP_MODES = ("none", "exact", "near")


@dataclass
class DedupReport:
    """What deduplication found: groups of file names (kept first) and how many copies were exact."""

    mode: str
    max_distance: int
    groups: list[list[str]]
    exact_copies: int
    near_duplicates: int

    def removed(self) -> int:
        return sum(len(g) - 1 for g in self.groups)

    def describe(self) -> dict:
        return {"mode": self.mode, "max_distance": self.max_distance if self.mode == "near" else None,
                "groups": len(self.groups), "images_removed": self.removed(), "exact_copies": self.exact_copies,
                "near_duplicates": self.near_duplicates,
                "examples": [{"kept": g[0], "dropped": g[1:]} for g in self.groups[:20]]}


def find_duplicates(data: FinetuneSet, mode: str = "near", max_distance: int = 4) -> tuple[list[list[int]], int, int]:
    """Groups (each of >= 2 indices, ascending, ordered by their first) of duplicates under ``mode``, with the
    number of exact copies and of near duplicates."""
    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
    if mode == "none":
        return [], 0, 0
    near = mode == "near"
    found = duplicate_groups(data.images, max_rms=NEAR_DUPLICATE_RMS if near else 0.0,
                             phash_bits=max_distance if near else None)
    groups = [np.nonzero(found.group == g)[0].tolist() for g in range(len(found.representatives))]
    return [g for g in groups if len(g) > 1], found.exact_copies, found.near_duplicates


def deduplicate(data: FinetuneSet, mode: str = "near", max_distance: int = 4) -> tuple[FinetuneSet, DedupReport]:
    """``data`` with every duplicate group reduced to its first image (captions merged), and the report."""
    groups, exact, near = find_duplicates(data, mode, max_distance)
    drop = {i for g in groups for i in g[1:]}
    captions = [list(c) for c in data.captions]
    for g in groups:
        for i in g[1:]:
            captions[g[0]] += [c for c in data.captions[i] if c not in captions[g[0]]]
    keep = [i for i in range(len(data)) if i not in drop]
    kept = FinetuneSet(data.images[keep], [captions[i] for i in keep], [data.files[i] for i in keep], data.source,
                       {**data.dropped, f"duplicate ({mode})": [data.files[i] for i in sorted(drop)]})
    return kept, DedupReport(mode, max_distance, [[data.files[i] for i in g] for g in groups], exact, near)
