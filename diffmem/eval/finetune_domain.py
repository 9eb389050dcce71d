"""A fine-tuning set with a purpose, and the extraction measure that goes with it.

Memorization-aware fine-tuning (MemControl, Dutt et al., WACV 2025) is only meaningful when the
fine-tuning set has something to *learn*: otherwise the method that changes the model least wins
every comparison. A :class:`DomainFinetuneSet` therefore has two parts:

- **learnt** captions of a domain the base model has not seen, each with several fresh training
  images, plus held-out images of the same captions (split into ``dev`` and ``test`` captions) on which
  a quality term (:func:`diffmem.eval.quality.heldout_denoising_loss`) measures what was learnt;
- **duplicated** identifier-like captions (titles), each with one image repeated ``copies`` times: the
  part that tempts memorization (Somepalli et al. 2023: duplicated image-caption pairs are what gets
  memorized), split into ``dev`` and ``test`` titles so that a search can be steered on one half and
  reported on the other.

:func:`diffmem.zoo.finetune_sets.build_sd_domain_set` fills one from the SD-like zoo corpus (the zoo
task hands its data to this general code; nothing here renders zoo images). :func:`title_extraction` is
the memorization measure: the share of generations of a title whose nearest fine-tuning image is that
title's own image, above a similarity threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffmem.eval.similarity import ssim_pairs

SPLITS: tuple[str, ...] = ("dev", "test")


@dataclass
class DomainFinetuneSet:
    """Captions and uint8 ``(N, H, W, 3)`` images of one fine-tuning set (see the module docstring).

    ``learn_split[i]`` / ``title_split[j]`` say whether learnt caption ``i`` / title ``j`` belongs to
    ``dev`` or ``test``; ``train_images[i]`` are caption ``i``'s fine-tuning images and
    ``heldout_images[i]`` its held-out ones; title ``j`` is trained ``copies[j]`` times on its one image.
    ``null_titles`` (split by ``null_split``) are titles of the same generator that are never trained: what a
    verdict's null is drawn from (:mod:`diffmem.eval.verdicts`).
    """

    learn_captions: list[str]
    learn_split: list[str]
    train_images: np.ndarray  # (n_captions, n_train, H, W, 3)
    heldout_images: np.ndarray  # (n_captions, n_heldout, H, W, 3)
    titles: list[str]
    title_split: list[str]
    title_images: np.ndarray  # (n_titles, H, W, 3)
    copies: list[int]  # per title
    config: dict = field(default_factory=dict)
    null_titles: list[str] = field(default_factory=list)
    null_split: list[str] = field(default_factory=list)
    learn_named: list = field(default_factory=list)  # per learnt caption: the factors it names (for read-back)

    def training_examples(self) -> tuple[list[str], np.ndarray]:
        """Every (caption, image) of one epoch, duplicates repeated: learnt images first, then titles."""
        n, k = self.train_images.shape[:2]
        captions = [c for c in self.learn_captions for _ in range(k)]
        captions += [t for t, c in zip(self.titles, self.copies) for _ in range(c)]
        images = np.concatenate([self.train_images.reshape(n * k, *self.train_images.shape[2:]),
                                 np.repeat(self.title_images, self.copies, axis=0)])
        return captions, images

    def finetune_set(self):
        """One epoch as a :class:`diffmem.finetune.dataset.FinetuneSet` (what ``diffmem finetune`` trains on)."""
        from diffmem.finetune.dataset import FinetuneSet

        captions, images = self.training_examples()
        return FinetuneSet(to_tensor(images), [[c] for c in captions], [f"{i:05d}.png" for i in range(len(images))],
                           "domain fine-tuning set")

    def duplicated_set(self, split: str | None = None):
        """The titles (of ``split``, or all) with their one image each, as a ``FinetuneSet``."""
        from diffmem.finetune.dataset import FinetuneSet

        rows = range(len(self.titles)) if split is None else self.title_indices(split)
        return FinetuneSet(to_tensor(self.title_images[list(rows)]), [[self.titles[j]] for j in rows],
                           [f"title{j:03d}.png" for j in rows], "duplicated titles")

    def unique_training_images(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, owner): each distinct fine-tuning image once; ``owner`` is its title's index, -1 for a
        learnt image (the index extraction searches)."""
        n, k = self.train_images.shape[:2]
        images = np.concatenate([self.train_images.reshape(n * k, *self.train_images.shape[2:]), self.title_images])
        owner = np.concatenate([np.full(n * k, -1), np.arange(len(self.titles))])
        return images, owner

    def heldout(self, split: str) -> tuple[list[str], np.ndarray]:
        """(captions, images) of the held-out images of the learnt captions in ``split``."""
        _check_split(split)
        rows = [i for i, s in enumerate(self.learn_split) if s == split]
        k = self.heldout_images.shape[1]
        return ([self.learn_captions[i] for i in rows for _ in range(k)],
                self.heldout_images[rows].reshape(len(rows) * k, *self.heldout_images.shape[2:]))

    def title_indices(self, split: str) -> list[int]:
        """Indices of the titles in ``split``."""
        _check_split(split)
        return [j for j, s in enumerate(self.title_split) if s == split]

    def summary(self) -> dict:
        """Sizes for a results file."""
        n_examples = len(self.train_images) * self.train_images.shape[1] + int(sum(self.copies))
        return {"learnt_captions": len(self.learn_captions),
                "train_images_per_caption": int(self.train_images.shape[1]),
                "heldout_images_per_caption": int(self.heldout_images.shape[1]),
                "learnt_captions_per_split": {s: self.learn_split.count(s) for s in SPLITS},
                "duplicated_titles": len(self.titles),
                "titles_per_split": {s: self.title_split.count(s) for s in SPLITS},
                "copies": {str(c): self.copies.count(c) for c in sorted(set(self.copies))},
                "null_titles": len(self.null_titles), "examples_per_epoch": n_examples,
                "duplicated_share": round(sum(self.copies) / n_examples, 4),
                "config": self.config}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` to float ``(N, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def title_extraction(generations: torch.Tensor, owner: list[int] | torch.Tensor, index: torch.Tensor,
                     index_owner: list[int] | torch.Tensor, threshold: float, candidates: int | None = 16) -> dict:
    """Share of generations that reproduce their own fine-tuning image.

    ``generations[i]`` was drawn for title ``owner[i]``; ``index`` holds every distinct fine-tuning image
    (as the model's VAE returns it, so that a perfect copy can score 1) and ``index_owner`` the title
    each belongs to (-1 for images of no title). A generation counts as extracted when its SSIM-nearest
    index image is its own title's image and that SSIM exceeds ``threshold``.

    SSIM over every (generation, index image) pair costs minutes on a CPU at a few hundred images, so
    with ``candidates`` the SSIM-nearest is searched among the ``candidates`` pixel-L2-nearest index
    images plus the generation's own image (``None``: all of them). An image with a higher SSIM but
    outside the L2 shortlist would be missed, which can only turn a non-extraction into an extraction
    when it is the own image, and the own image is always scored.

    Returns ``share``, the per-generation ``extracted`` flags, ``own_ssim`` (SSIM to its own image; None for an
    owner with no image, such as a never-trained title's -2), ``best_ssim`` (to the SSIM-nearest index image)
    and ``best_owner`` (that image's title, -1 for none).
    """
    from diffmem.eval.similarity import l2_nearest

    owner = torch.as_tensor(owner)
    index_owner = torch.as_tensor(index_owner)
    if len(generations) != len(owner):
        raise ValueError(f"{len(generations)} generations but {len(owner)} owners")
    n, m = len(generations), len(index)
    if candidates is None or candidates >= m:
        shortlist = [torch.arange(m) for _ in range(n)]
    else:
        _, ids = l2_nearest(generations, index, k=candidates)
        shortlist = [torch.unique(torch.cat([ids[i].cpu(), torch.nonzero(index_owner == owner[i]).flatten()]))
                     for i in range(n)]
    rows = torch.cat([torch.full((len(c),), i) for i, c in enumerate(shortlist)])
    cols = torch.cat(shortlist)
    sim = ssim_pairs(generations[rows], index[cols])
    extracted, own_ssim, best_ssim, best_owner = [], [], [], []
    for i in range(n):
        s, c = sim[rows == i], cols[rows == i]
        best = int(s.argmax())
        extracted.append(bool(index_owner[c[best]] == owner[i]) and float(s[best]) > threshold)
        own = s[index_owner[c] == owner[i]]
        own_ssim.append(round(float(own.max()), 4) if len(own) else None)
        best_ssim.append(float(s[best]))
        best_owner.append(int(index_owner[c[best]]))
    return {"share": float(np.mean(extracted)) if n else 0.0, "extracted": extracted, "own_ssim": own_ssim,
            "best_ssim": best_ssim, "best_owner": best_owner}


@dataclass
class OwnImageVerdicts:
    """Per caption: its generations that land on its own image, the null rate, p, q and verdict (two tests)."""

    nearest: Any  # Verdicts: generations whose nearest fine-tuning image is the caption's own
    nearest_null_rate: np.ndarray  # per caption: share of never-trained captions' generations nearest its image
    similar: Any  # Verdicts: generations whose SSIM to the own image beats that image's null threshold
    similar_nulls: list  # per caption: GenerationNull of never-trained generations' SSIM to its image


def own_image_verdicts(own_similarity: np.ndarray, own_nearest: np.ndarray, null_generations: torch.Tensor,
                       null_best: np.ndarray, own_images: torch.Tensor, q: float = 0.05) -> OwnImageVerdicts:
    """Verdicts on "this caption's generations reproduce *its own* training image beyond chance", where chance
    is what the same model draws for never-trained captions of the same family.

    ``own_similarity`` / ``own_nearest`` ``(m, k)``: each of caption ``i``'s ``k`` generations' SSIM to its own
    image ``own_images[i]``, and whether that image is its nearest fine-tuning image. ``null_generations`` and
    ``null_best`` (their best SSIM to any fine-tuning image) are the never-trained captions' generations. Two
    tests, each a binomial test per caption against *its own image's* null rate, Benjamini-Hochberg at ``q``:

    - ``nearest`` (the headline): a generation counts when its nearest fine-tuning image is the caption's own
      (Carlini et al. 2023's extraction criterion without a distance cut); the null rate of image ``i`` is the
      share of never-trained captions' generations for which image ``i`` would be nearest (+1 smoothing);
    - ``similar``: a generation counts when its SSIM to the own image beats the 0.99 quantile of never-trained
      generations' SSIM to that image.

    A duplicated image that the model draws for *any* caption of the family raises its own null rate, so it is
    not credited to its caption: that is regurgitation, which a caption-level verdict cannot attribute and the
    caller reports separately. Why not the labeller's best-match null (any image): when never-trained captions'
    generations themselves copy duplicated images, that null's tail is made of copies, its threshold rises to
    copy level and no caption is called (measured on the fine-tuning task). ``similar`` has the same weakness
    per image once more than 1% of the null copies it; ``nearest`` does not, as a rate."""
    from diffmem.eval.verdicts import Verdicts, bh_q_values, binomial_p, count_bound, decide, fit_generation_null

    m, n = len(own_images), len(null_generations)
    sims = ssim_pairs(null_generations.repeat(m, 1, 1, 1), own_images.repeat_interleave(n, 0)).reshape(m, n).numpy()
    similar_nulls = [fit_generation_null(sims[i], what=f"never-trained captions' generations against image {i}")
                     for i in range(m)]
    null_nearest = sims >= np.asarray(null_best, dtype=np.float64)[None, :] - 1e-6
    rate = (1 + null_nearest.sum(1)) / (n + 1)
    own_nearest = np.asarray(own_nearest, dtype=bool)
    k = own_nearest.shape[1]
    x = own_nearest.sum(1)
    p = binomial_p(x, k, rate)
    qv = bh_q_values(p)
    margin = np.asarray(own_similarity, dtype=np.float64).max(1)
    nearest = Verdicts(x, np.full(m, k), x / k, p, qv, qv <= q, margin, count_bound(p, q))
    return OwnImageVerdicts(nearest, rate, decide(np.asarray(own_similarity, dtype=np.float64), similar_nulls, q),
                            similar_nulls)
