"""Deduplicating a fine-tuning set before training: duplicated image-caption pairs are what gets memorized
(Somepalli et al. 2023; Carlini et al. 2023; Webster 2023), so removing them is the first training-time
mitigation.

- **exact**: identical pixels at the training resolution (the same file saved twice, or re-encoded losslessly);
- **near**: perceptual-hash neighbours (``imagehash.phash``, 64-bit DCT hash, Zauner 2010): two images whose
  hashes differ in at most ``max_distance`` bits. Re-compressed, resized, slightly shifted or recoloured
  copies land here; the default of 4 bits is checked against different pictures of one caption in
  ``tests/test_finetune.py``.

Duplicates are grouped transitively (connected components, networkx); each group keeps its first image in
file order, and the captions of the images it drops move to the kept image (no caption is lost: with the
multi-caption mitigation on, training draws among them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.finetune.dataset import FinetuneSet

DEDUP_MODES = ("none", "exact", "near")


@dataclass
class DedupReport:
    """What deduplication found: groups of file names (kept first) and how each was matched."""

    mode: str
    max_distance: int
    groups: list[list[str]]
    matched_by: list[str]  # per group: "exact" or "near"

    def removed(self) -> int:
        return sum(len(g) - 1 for g in self.groups)

    def describe(self) -> dict:
        return {"mode": self.mode, "max_distance": self.max_distance if self.mode == "near" else None,
                "groups": len(self.groups), "images_removed": self.removed(),
                "exact_groups": self.matched_by.count("exact"), "near_groups": self.matched_by.count("near"),
                "examples": [{"kept": g[0], "dropped": g[1:], "matched_by": m}
                             for g, m in zip(self.groups[:20], self.matched_by[:20])]}


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def exact_keys(images: torch.Tensor) -> list[str]:
    """SHA-256 of each image's uint8 pixels."""
    return [hashlib.sha256(a.tobytes()).hexdigest() for a in _uint8(images)]


def perceptual_hashes(images: torch.Tensor) -> np.ndarray:
    """``(N, 64)`` boolean pHash bits of each image."""
    import imagehash
    from PIL import Image

    return np.stack([imagehash.phash(Image.fromarray(a)).hash.flatten() for a in _uint8(images)])


def duplicate_groups(images: torch.Tensor, mode: str = "near", max_distance: int = 4
                     ) -> tuple[list[list[int]], list[str]]:
    """Groups (each of >= 2 indices, ascending) of exact or near duplicates, and how each group was matched."""
    import networkx as nx

    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode must be one of {DEDUP_MODES}, got {mode!r}")
    graph = nx.Graph()
    graph.add_nodes_from(range(len(images)))
    if mode == "none":
        return [], []
    keys = exact_keys(images)
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in first:
            graph.add_edge(first[k], i, how="exact")
        else:
            first[k] = i
    if mode == "near":
        bits = perceptual_hashes(images).astype(np.int8)
        distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
        for i, j in zip(*np.nonzero(np.triu(distance <= max_distance, k=1))):
            if not graph.has_edge(int(i), int(j)):
                graph.add_edge(int(i), int(j), how="exact" if keys[i] == keys[j] else "near")
    groups, how = [], []
    for component in nx.connected_components(graph):
        if len(component) < 2:
            continue
        members = sorted(component)
        groups.append(members)
        edges = graph.subgraph(members).edges(data="how")
        how.append("exact" if all(h == "exact" for _, _, h in edges) else "near")
    order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    return [groups[g] for g in order], [how[g] for g in order]


def deduplicate(data: FinetuneSet, mode: str = "near", max_distance: int = 4) -> tuple[FinetuneSet, DedupReport]:
    """``data`` with every duplicate group reduced to its first image (captions merged), and the report."""
    groups, how = duplicate_groups(data.images, mode, max_distance)
    drop = {i for g in groups for i in g[1:]}
    captions = [list(c) for c in data.captions]
    for g in groups:
        for i in g[1:]:
            captions[g[0]] += [c for c in data.captions[i] if c not in captions[g[0]]]
    keep = [i for i in range(len(data)) if i not in drop]
    kept = FinetuneSet(data.images[keep], [captions[i] for i in keep], [data.files[i] for i in keep], data.source,
                       {**data.dropped, f"duplicate ({mode})": [data.files[i] for i in sorted(drop)]})
    report = DedupReport(mode, max_distance, [[data.files[i] for i in g] for g in groups], how)
    return kept, report
