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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffmem.eval.similarity import l2_nearest, ssim_pairs
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
        size = tuple(self.train.shape[-2:])
        if tuple(queries.shape[-2:]) == size:
            return queries.float()
        return F.interpolate(queries.float(), size=size, mode="bilinear", antialias=True, align_corners=False)

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
