"""A user's checkpoint as a benchmark task: memorized list + ordinary list + optional image folder.

- Memorized prompts: a prompt file (any format :func:`~diffmem.prompts.load_prompts` reads); an
  ``own_item`` column may name each prompt's own training image (its index in the image folder's
  sorted file order).
- Ordinary prompts: a prompt file of prompts the model should keep drawing as it does.
- Training index: the image folder when given (``--train-index DIR``, every image its own item, the
  matcher's default threshold unless ``threshold`` is set). Without one, the index is built from the
  *original* model's own generations of the memorized prompts (``pseudo_samples`` per prompt, each
  prompt its own item): extraction then means "still draws what the unmitigated model repeated", the
  best stand-in when the training images are not at hand.
- Fidelity: CLIP score through open_clip when a local weights file is given (``clip_weights``), else
  not measured (``{}``). FID needs a feature extractor and is not computed for a folder task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.attacks.base import TrainingIndex
from diffmem.errors import DiffmemError
from diffmem.eval.matching import make_matcher
from diffmem.extract import folder_training_index, own_items_of
from diffmem.prompts import load_prompts
from diffmem.tasks.base import TASKS, BenchTask, MemorizedPrompt, SplitSizes, TaskSplits, split_by_seed


@TASKS.register("folder")
@dataclass
class FolderTask(BenchTask):
    """Benchmark on any checkpoint from a memorized list, an ordinary list and an optional image folder."""

    name = "folder"
    memorized: str = ""
    ordinary: str = ""
    train_index: str | None = None
    matcher: str = "ssim"
    threshold: float | None = None
    index_size: int = 64
    pseudo_samples: int = 2
    pseudo_steps: int = 25
    clip_weights: str | None = None
    clip_arch: str = "ViT-B-32"

    def __post_init__(self) -> None:
        if not self.memorized or not self.ordinary:
            raise DiffmemError("a folder task needs --memorized FILE and --ordinary FILE")
        self._memorized = load_prompts(self.memorized)
        self._ordinary = load_prompts(self.ordinary)
        self._own = own_items_of(self._memorized)

    def _all_memorized(self) -> list[MemorizedPrompt]:
        if self.train_index is None:  # the pseudo index numbers the prompts in file order
            return [MemorizedPrompt(t, i) for i, t in enumerate(self._memorized.texts)]
        return [MemorizedPrompt(t, o) for t, o in zip(self._memorized.texts, self._own)]

    def splits(self, seed: int, sizes: SplitSizes = SplitSizes()) -> TaskSplits:
        return split_by_seed(self._all_memorized(), list(self._ordinary.texts), seed, sizes)

    def build_index(self, model) -> TrainingIndex:
        if self.train_index is not None:
            return folder_training_index(Path(self.train_index), self.matcher, self.threshold, size=self.index_size)
        k = self.pseudo_samples
        texts = self._memorized.texts
        images = model.sample([t for t in texts for _ in range(k)], [50_000 + j for _ in texts for j in range(k)],
                              num_inference_steps=self.pseudo_steps).images
        m = make_matcher(self.matcher).fit(images)
        return TrainingIndex(images, np.repeat(np.arange(len(texts)), k), m,
                             m.default_threshold if self.threshold is None else self.threshold)

    def fidelity(self, images: torch.Tensor, captions: list[str]) -> dict[str, float | None]:
        if self.clip_weights is None:
            return {}
        from diffmem.eval.quality import open_clip_score

        return {"clip_score": open_clip_score(images, captions, self.clip_weights, self.clip_arch)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "memorized": self.memorized, "ordinary": self.ordinary,
                "train_index": self.train_index or "pseudo: the original model's generations of the memorized prompts",
                "matcher": self.matcher, "threshold": self.threshold,
                "fidelity": "open_clip CLIP score" if self.clip_weights else "not measured (no local CLIP weights)"}
