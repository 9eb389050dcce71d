"""Nearest-neighbour distance ratio of early clean-image estimates to the training set.

Carlini et al. ("Extracting Training Data from Diffusion Models", USENIX Security 2023, Sec. 4.2)
call a generation extracted when it is much closer to its nearest training image than to the
others: a relative, not an absolute, distance. We score a prompt by that ratio on cheap generations:

    r_j = d(x0_hat_j, n_1) / d(x0_hat_j, n_2),     score = 1 - mean_j r_j

where x0_hat_j is the sampler's clean-image estimate after the first ``stop_after`` of ``steps``
CFG DDIM steps from seed j (a memorized image is already there; Wen et al. 2024 observe that
memorized prompts settle in the first steps), n_1 and n_2 are its two most similar training images
under the chosen matcher (SSIM by default, the zoo's ground-truth similarity) and d = 1 - similarity.
A replica sits on one training image (r near 0); a novel image sits between many (r near 1).

The training index is deduplicated first (``dedup``, default on): exact copies and near duplicates
(pixel RMS distance at most ``near_duplicate_rms``, default 0.01 = 2.5 grey levels) form one group, and
n_2 is the nearest image of another group than n_1's. Without it, a
memorized image -- duplicated in the training set by definition -- has two copies of itself as n_1 and
n_2, and its margin is 0 (on an independent model's index with copies, nn-margin's AUROC fell from 0.986
to 0.109). The group counts are reported in the detector's config (provenance).

The ratio needs no threshold per caption family: an absolute similarity does (a plain single object
is close to many training images; a textured scene is close to none), which is why the zoo's
absolute-similarity and guidance-magnitude scores rank ordinary objects above memorized scenes.
It needs the training images: a model owner's audit, not a third party's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffmem.detectors.base import DETECTORS, PromptDetector, unbound_error
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.errors import DiffmemError
from diffmem.eval.matching import NEAR_DUPLICATE_RMS, DuplicateGroups, duplicate_groups, nearest_two_groups

if TYPE_CHECKING:
    from diffmem.attacks.base import TrainingIndex

log = logging.getLogger(__name__)


@DETECTORS.register("nn-ratio", "carlini-ratio")
@dataclass
class NeighbourRatio(PromptDetector):
    """1 - mean over seeds of d(nearest) / d(second nearest) training image of early x0 estimates."""

    name = "nn-ratio"
    samples: int = 4
    steps: int = 10
    stop_after: int = 4
    guidance_scale: float = 7.5
    matcher: str = "ssim"
    index: str | None = None  # folder of training images (default: the zoo's training set)
    index_size: int = 64  # a folder's images are resized to this side; generations are resized to match
    seed_offset: int = 0
    dedup: bool = True
    near_duplicate_rms: float = NEAR_DUPLICATE_RMS  # 0: exact copies only
    _index: TrainingIndex | None = field(default=None, repr=False, compare=False)
    _groups: DuplicateGroups | None = field(default=None, repr=False, compare=False)
    _zoo: Path | None = field(default=None, repr=False, compare=False)

    def bind(self, model) -> None:
        """Without ``index``, compare with the training set of the zoo the model was loaded from (a zoo folder
        holds ``zoo.json`` beside ``pipeline/``); any other model must name its training images."""
        if self.index:
            return
        from diffmem.zoo.load import zoo_folder_of

        self._zoo = zoo_folder_of(model)
        if self._zoo is None:
            raise DiffmemError(f"{self.name} compares generations with the model's training images, and "
                               f"'{model.source}' is not a diffmem zoo: give them with "
                               f"--option {self.name}.index=FOLDER")

    def training_index(self) -> TrainingIndex:
        """The matcher fitted on the training images (``index``, else the bound zoo's), built once; an unbound
        detector without ``index`` is refused, not pointed at the default zoo's images."""
        if self._index is None:
            if not self.index and self._zoo is None:
                raise unbound_error(self.name, "the model's training images", "index")
            from diffmem.extract import folder_training_index
            from diffmem.tasks.zoo import zoo_training_index

            self._index = (folder_training_index(Path(self.index), self.matcher, size=self.index_size) if self.index
                           else zoo_training_index(self.matcher, zoo=self._zoo))
        return self._index

    def duplicate_groups(self) -> DuplicateGroups | None:
        """The training index's duplicate groups (None without ``dedup``), built once."""
        if self.dedup and self._groups is None:
            matcher = self.training_index().matcher
            groups = duplicate_groups(matcher.train, self.near_duplicate_rms)
            if len(groups.representatives) < 2:
                raise DiffmemError(f"{self.name}: the training index holds {len(groups.group)} image(s) in "
                                   f"{len(groups.representatives)} duplicate group; a margin needs at least 2")
            if len(groups.representatives) < len(groups.group):
                log.info("%s: %d training images form %d duplicate groups (%d exact copies, %d near duplicates); "
                         "margins are taken to the nearest other group", self.name, len(groups.group),
                         len(groups.representatives), groups.exact_copies, groups.near_duplicates)
            self._groups = groups
        return self._groups

    def config(self) -> dict:
        """Settings, and the training index's duplicate groups (the index is built here, before any scoring)."""
        cfg = super().config()
        groups = self.duplicate_groups()
        cfg["training_index"] = (groups.summary() if groups is not None
                                 else {"images": len(self.training_index().images), "dedup": False})
        return cfg

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        b, k = len(embeddings), self.samples
        seeds = engine.generation_seeds(b, k, self.seed_offset, prompt_ids)
        images = model.early_estimate(embeddings.repeat_interleave(k, 0), seeds, num_inference_steps=self.steps,
                                      stop_after=self.stop_after, guidance_scale=self.guidance_scale)
        engine.unet_calls += 2 * self.stop_after * b * k
        matcher, groups = self.training_index().matcher, self.duplicate_groups()
        if groups is None:
            top = matcher.match_top(images, 2)
            nearest, second = top.similarity[:, 0], top.similarity[:, 1]
        else:
            nearest, second = nearest_two_groups(matcher, groups, images)
        return self.criterion(nearest, second, matcher).view(b, k).mean(1)

    def criterion(self, nearest: torch.Tensor, second: torch.Tensor, matcher) -> torch.Tensor:
        """Per generation: 1 - d(n1) / d(n2) from the similarities of the two nearest training images."""
        return 1.0 - matcher.distance(nearest) / matcher.distance(second).clamp_min(1e-8)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        return float(2 * self.stop_after * self.samples)


@DETECTORS.register("nn-margin")
@dataclass
class NeighbourMargin(NeighbourRatio):
    """Mean over 8 seeds of sim(n1) - sim(n2): the nearest training image's lead, on x0 after 8 of 10 steps.

    The same generations and matcher as ``nn-ratio``, an additive instead of a multiplicative margin. A
    ratio of distances blows up where both distances are small (a textured scene whose two nearest
    training images are near-duplicates of each other, as the zoo's template images are) and is noisy
    on the blurry x0 of 4 steps; the margin is bounded and measured on a sharper estimate. On the zoo it
    ranks better (``benchmarks/detection.py``), which is the reason it exists beside the paper's ratio.
    """

    name = "nn-margin"
    samples: int = 8
    stop_after: int = 8

    def criterion(self, nearest: torch.Tensor, second: torch.Tensor, matcher) -> torch.Tensor:
        return nearest - second
