"""Matching generations to a training set: one interface, three similarities.

Every matcher answers, for each query image, the most similar training image and its similarity
(higher = more similar), searching with torch chunked matrix products (faiss is used instead when it
is installed and ``use_faiss=True``, for very large training sets):

- ``ssim``: pixel-L2 shortlist of ``candidates`` neighbours, then SSIM (parameters in
  :mod:`diffmem.eval.similarity`); the zoo's ground truth uses this matcher;
- ``l2``: negative pixel L2 / sqrt(CHW) (Gu et al. 2025's distance, negated so higher = closer);
- ``deepssim``: cosine of DeepSSIM embeddings.

A match is *matching verbatim* when the nearest image belongs to the prompt's own training item and
*template verbatim* when it belongs to another item; ``none`` below the threshold.

:func:`duplicate_groups` partitions a training index into groups of exact copies and near duplicates
(pixel RMS distance at most ``max_rms``, re-encoding or resampling noise): real training sets hold many
copies of an image (memorized images, by definition), and a margin or ratio between a generation's two
nearest training images is meaningless when both are copies of one image.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.eval.similarity import l2_nearest, resize_images, ssim_pairs
from diffmem.registry import Registry

MATCHERS: Registry[Matcher] = Registry("matcher")


@dataclass
class MatchResult:
    """Best training match per query: similarity and training-image index, ``(N,)`` (``(N, k)`` from match_top)."""

    similarity: torch.Tensor
    index: torch.Tensor


class Matcher(ABC):
    """Finds each query's most similar image in an index of training images (both in [0, 1])."""

    name = "matcher"
    default_threshold: float = 0.5

    def fit(self, train_images: torch.Tensor) -> Matcher:
        self.train = train_images.float()
        return self

    def resize(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries at the training images' size (generations may be larger than the stored index)."""
        return resize_images(queries, tuple(self.train.shape[-2:]))

    def match(self, queries: torch.Tensor) -> MatchResult:
        """Nearest training image of every query (resized to the index's size first)."""
        top = self.match_top(queries, 1)
        return MatchResult(top.similarity[:, 0], top.index[:, 0])

    def match_top(self, queries: torch.Tensor, k: int = 2) -> MatchResult:
        """The ``k`` most similar training images of every query, best first: ``(N, k)`` similarity and index."""
        if not 1 <= k <= len(self.train):
            raise ValueError(f"k must be in [1, {len(self.train)} training images], got {k}")
        return self._match_top(self.resize(queries), k)

    def distance(self, similarity: torch.Tensor) -> torch.Tensor:
        """A non-negative distance from this matcher's similarity (0 = identical), for ratios of distances."""
        return (1.0 - similarity).clamp_min(0.0)

    def subset(self, keep: torch.Tensor | np.ndarray) -> Matcher:
        """A copy that searches only the training images ``keep`` (indices into the fitted index), renumbered."""
        out = copy.copy(self)
        out.train = self.train[torch.as_tensor(keep, dtype=torch.long)]
        return out

    @abstractmethod
    def _match_top(self, queries: torch.Tensor, k: int) -> MatchResult:
        """The k nearest training images of queries already at the index's size."""

    @abstractmethod
    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Similarity of ``a[i]`` with ``b[i]``."""


@MATCHERS.register("ssim")
class SSIMMatcher(Matcher):
    name = "ssim"

    def __init__(self, candidates: int = 8):
        self.candidates = candidates

    def _match_top(self, queries: torch.Tensor, k: int) -> MatchResult:
        _, ids = l2_nearest(queries, self.train, k=max(k, self.candidates))
        sims = torch.stack([ssim_pairs(queries, self.train[ids[:, c]]) for c in range(ids.shape[1])], 1)
        best, order = sims.topk(k, dim=1)
        return MatchResult(best, ids.gather(1, order))

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ssim_pairs(a, b)


@MATCHERS.register("l2")
class L2Matcher(Matcher):
    name = "l2"
    default_threshold = -0.05

    def _match_top(self, queries: torch.Tensor, k: int) -> MatchResult:
        d, ids = l2_nearest(queries, self.train, k=k)
        return MatchResult(-d, ids)

    def distance(self, similarity: torch.Tensor) -> torch.Tensor:
        return -similarity

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -((a - b).flatten(1).pow(2).mean(1)).sqrt()


@MATCHERS.register("deepssim")
class DeepSSIMMatcher(Matcher):
    name = "deepssim"
    default_threshold = 0.85  # the paper's duplicate flag

    def __init__(self, embedder=None, use_faiss: bool = False, chunk: int = 1024):
        self.embedder, self.use_faiss, self.chunk = embedder, use_faiss, chunk

    def _embedder(self):
        if self.embedder is None:
            from diffmem.detectors.deepssim import default_embedder_path
            from diffmem.eval.deepssim import DeepSSIM

            self.embedder = DeepSSIM.load(default_embedder_path())
        return self.embedder

    def fit(self, train_images: torch.Tensor) -> Matcher:
        super().fit(train_images)
        self.index = self._embedder().embed(self.train)
        return self

    def subset(self, keep: torch.Tensor | np.ndarray) -> Matcher:
        out = super().subset(keep)
        out.index = self.index[torch.as_tensor(keep, dtype=torch.long)]
        return out

    def _match_top(self, queries: torch.Tensor, k: int) -> MatchResult:
        q = self._embedder().embed(queries)
        if self.use_faiss:
            import faiss

            idx = faiss.IndexFlatIP(self.index.shape[1])
            idx.add(self.index.numpy())
            sims, ids = idx.search(q.numpy(), k)
            return MatchResult(torch.from_numpy(sims), torch.from_numpy(ids))
        sims, ids = [], []
        for s in range(0, len(q), self.chunk):
            v, i = (q[s : s + self.chunk] @ self.index.T).topk(k, dim=1)
            sims.append(v)
            ids.append(i)
        return MatchResult(torch.cat(sims), torch.cat(ids))

    def pairwise(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        e = self._embedder()
        return (e.embed(a) * e.embed(b)).sum(-1)


def make_matcher(name: str, **options) -> Matcher:
    return MATCHERS.get(name)(**options)


NEAR_DUPLICATE_RMS = 0.01  # pixel RMS distance (images in [0, 1]): about 2.5 of 255 grey levels


@dataclass
class DuplicateGroups:
    """A partition of a training index into duplicate groups (numbered by their first image, in index order)."""

    group: np.ndarray  # (M,) group id of every image
    representatives: np.ndarray  # (G,) the first image of each group, in index order
    exact_copies: int  # images identical (pixel for pixel) to an earlier one
    near_duplicates: int  # images joined to a group only as near duplicates
    max_rms: float  # the pixel RMS distance at or below which two images are near duplicates (0: exact only)

    def summary(self) -> dict:
        return {"images": int(len(self.group)), "groups": int(len(self.representatives)),
                "exact_copies": self.exact_copies, "near_duplicates": self.near_duplicates,
                "near_duplicate_rms": self.max_rms}


def perceptual_hashes(images: torch.Tensor) -> np.ndarray:
    """``(N, 64)`` boolean pHash bits of each image (``imagehash.phash``: the DCT of a 32x32 grey image, Zauner
    2010), which survive re-encoding, resizing and small shifts or colour changes."""
    import imagehash
    from PIL import Image

    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.stack([imagehash.phash(Image.fromarray(a)).hash.flatten() for a in arrays])


def duplicate_groups(images: torch.Tensor, max_rms: float = NEAR_DUPLICATE_RMS, candidates: int = 8,
                     phash_bits: int | None = None) -> DuplicateGroups:
    """Group exact copies (identical pixels) and near duplicates: pairs among each image's ``candidates`` nearest
    neighbours whose pixel RMS distance (Gu et al. 2025's L2 / sqrt(CHW)) is at most ``max_rms``, joined
    transitively (union-find). A pixel criterion, not the matcher's similarity: on small renders two different
    images can score SSIM 0.99 (the zoo's single objects), while a re-encoded or resampled copy stays within a
    few grey levels everywhere. With ``phash_bits``, pairs whose perceptual hashes (:func:`perceptual_hashes`)
    differ in at most that many of 64 bits are joined too (shifted, cropped or recoloured copies; all pairs are
    compared, so meant for fine-tuning sets of up to some thousands of images)."""
    m = len(images)
    parent = np.arange(m)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    flat = images.reshape(m, -1).float().contiguous()
    first: dict[bytes, int] = {}
    exact = 0
    for i in range(m):
        key = flat[i].numpy().tobytes()
        if key in first:
            union(first[key], i)
            exact += 1
        else:
            first[key] = i
    after_exact = len({find(i) for i in range(m)})
    if max_rms > 0 and m > 1:
        d, ids = l2_nearest(flat, flat, k=min(candidates + 1, m))
        rows = torch.arange(m)[:, None].expand_as(ids)
        near = (d <= max_rms) & (ids != rows)
        for i, j in zip(rows[near].tolist(), ids[near].tolist()):
            union(i, j)
    if phash_bits is not None and m > 1:
        signs = torch.from_numpy(perceptual_hashes(images).astype(np.float32) * 2 - 1)  # Hamming = (64 - s.s') / 2
        for start in range(0, m, 1024):  # row blocks: memory stays O(1024 m)
            distance = (signs.shape[1] - signs[start:start + 1024] @ signs.T) / 2
            rows, cols = torch.nonzero(distance <= phash_bits + 0.5, as_tuple=True)
            for i, j in zip((rows + start).tolist(), cols.tolist()):
                if i < j:
                    union(i, j)
    roots = np.array([find(i) for i in range(m)])
    reps = np.unique(roots)  # a root is the smallest index of its group
    return DuplicateGroups(group=np.searchsorted(reps, roots), representatives=reps, exact_copies=exact,
                           near_duplicates=after_exact - len(reps), max_rms=float(max_rms))


def nearest_two_groups(matcher: Matcher, groups: DuplicateGroups, queries: torch.Tensor, max_k: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the similarity of its nearest training image and of the nearest image in *another* duplicate group.

    ``matcher`` is fitted on every image of the index that ``groups`` partitions. The second group is searched
    among the query's ``1 + largest group`` (at most ``max_k``) nearest images; where all of those belong to the
    nearest image's group, among the groups' first images instead.
    """
    sizes = np.bincount(groups.group)
    k = int(min(len(groups.group), max(2, min(max_k, int(sizes.max()) + 1))))
    top = matcher.match_top(queries, k)
    group_of = torch.as_tensor(groups.group, dtype=torch.long)
    grp = group_of[top.index]  # (N, k)
    other = grp != grp[:, :1]
    nearest = top.similarity[:, 0]
    second = top.similarity.gather(1, other.float().argmax(1, keepdim=True))[:, 0].clone()
    missing = ~other.any(1)
    if missing.any():
        reps = matcher.subset(groups.representatives).match_top(queries[missing], 2)  # rep i stands for group i
        pick = (reps.index[:, 0] == grp[missing, 0]).long()[:, None]
        second[missing] = reps.similarity.gather(1, pick)[:, 0]
    return nearest, second
