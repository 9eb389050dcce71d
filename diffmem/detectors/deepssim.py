"""DeepSSIM detectors (2025): generate a few images per prompt and compare them in DeepSSIM space.

- ``deepssim-seeds``: mean pairwise cosine of the generations of one prompt across seeds. A prompt
  that always yields the same image (a memorized one) scores near 1; a prompt with many valid images
  scores lower.
- ``deepssim-train``: max over seeds of the cosine to the nearest training image (needs an index of
  training-image embeddings; for the zoo, its corpus).

Image-space detectors cost full sampling (``samples * steps * 2`` UNet calls per prompt): use them
to confirm what the noise-step detectors flag, not to scan millions of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffmem.detectors.base import DETECTORS, PromptDetector, unbound_error
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.errors import DiffmemError

if TYPE_CHECKING:  # imported when an embedder loads: torchmetrics and sklearn would add ~1 s to every scan's start
    from diffmem.eval.deepssim import DeepSSIM


def default_embedder_path(zoo: Path | None = None) -> Path:
    """The DeepSSIM embedder shipped with a zoo (default: the shipped zoo)."""
    from diffmem.zoo.paths import zoo_dir

    return (zoo or zoo_dir()) / "deepssim"


def zoo_training_embeddings(embedder: DeepSSIM, zoo: Path | None = None) -> torch.Tensor:
    """DeepSSIM embeddings of a zoo's unique training images (through its VAE; default: the shipped zoo)."""
    from diffmem.zoo.load import zoo_training_set

    return embedder.embed(zoo_training_set(zoo).reference)


@dataclass
class _DeepSSIMBase(PromptDetector):
    samples: int = 4
    steps: int = 25
    guidance_scale: float = 7.5
    seed_offset: int = 0
    embedder: str | None = None  # folder of a trained DeepSSIM (default: the zoo's)
    _model: DeepSSIM | None = field(default=None, repr=False, compare=False)
    _zoo: Path | None = field(default=None, repr=False, compare=False)

    def bind(self, model) -> None:
        """Without ``embedder``, use the embedder of the zoo the model came from; any other model needs one
        trained on its own images (the zoo's knows 32x32 synthetic scenes only)."""
        from diffmem.zoo.load import zoo_folder_of

        self._zoo = zoo_folder_of(model)
        if self._zoo is None and self.embedder is None:
            raise DiffmemError(f"{self.name} embeds images with a DeepSSIM model of the scanned model's domain, and "
                               f"'{model.source}' is not a diffmem zoo: train one with `diffmem deepssim train` "
                               f"and give it with --option {self.name}.embedder=FOLDER")

    def load_embedder(self) -> DeepSSIM:
        if self._model is None:
            from diffmem.eval.deepssim import DeepSSIM

            if self.embedder is None and self._zoo is None:
                raise unbound_error(self.name, "a DeepSSIM embedder of the model's domain", "embedder")
            self._model = DeepSSIM.load(self.embedder or default_embedder_path(self._zoo))
        return self._model

    def generate_embeddings(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                            prompt_ids: list[int] | None = None) -> torch.Tensor:
        b, k = len(embeddings), self.samples
        seeds = engine.generation_seeds(b, k, self.seed_offset, prompt_ids)
        images = model.sample(embeddings=embeddings.repeat_interleave(k, 0), seeds=seeds,
                              num_inference_steps=self.steps, guidance_scale=self.guidance_scale).images
        engine.unet_calls += 2 * self.steps * b * k
        return self.load_embedder().embed(images).view(b, k, -1)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        return float(2 * self.steps * self.samples)


@DETECTORS.register("deepssim-seeds")
@dataclass
class DeepSSIMSeeds(_DeepSSIMBase):
    """Mean pairwise DeepSSIM cosine across ``samples`` generations of a prompt."""

    name = "deepssim-seeds"

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        if self.samples < 2:
            raise ValueError("deepssim-seeds needs samples >= 2")
        e = self.generate_embeddings(model, embeddings, engine, prompt_ids)
        sim = e @ e.transpose(1, 2)
        k = self.samples
        return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (k * (k - 1))


@DETECTORS.register("deepssim-train")
@dataclass
class DeepSSIMTrain(_DeepSSIMBase):
    """Max over generations of the DeepSSIM cosine to the nearest training image."""

    name = "deepssim-train"
    _index: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def set_index(self, train_embeddings: torch.Tensor) -> None:
        self._index = train_embeddings

    def bind(self, model) -> None:
        """As the base, and a model that is not a zoo must have its training embeddings set (``set_index``)."""
        if self._index is None:
            super().bind(model)
            if self._zoo is None:
                raise DiffmemError(f"{self.name} needs the embeddings of '{model.source}''s training images "
                                   "(DeepSSIMTrain.set_index); only a diffmem zoo finds its own")

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        if self._index is None:
            if self._zoo is None:
                raise unbound_error(self.name, "the embeddings of the model's training images", "embedder")
            self._index = zoo_training_embeddings(self.load_embedder(), self._zoo)
        e = self.generate_embeddings(model, embeddings, engine, prompt_ids)
        best = torch.cat([(chunk @ self._index.T).amax(-1) for chunk in e.split(256)])
        return best.amax(1)
