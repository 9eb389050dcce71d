"""Shared machinery of the inference baselines that redraw their perturbation for every generation.

Somepalli et al.'s baselines (code: somepago/DCR) perturb the conditioning afresh each time the pipeline is
called: random words drawn with the global NumPy RNG per prompt (``diff_inference.py`` L14-22, L171-175),
Gaussian noise drawn by ``torch.randn_like`` inside ``_encode_prompt`` (L3-6), so every generation gets its
own draw and no draw depends on what else is in the batch. diffmem reproduces that deterministically:

- ``model.sample(prompts, seeds)``: generation ``(prompt, seed)`` gets the draw seeded by
  ``(mitigator seed, generation seed, prompt)``: two seeds of one prompt differ, a prompt sampled alone
  equals the same prompt sampled in a batch;
- ``model.encode_prompts(prompts)`` outside sampling (detectors, attacks): a fresh draw per call, seeded by
  ``(mitigator seed, call number, prompt, occurrence in the call)``, so repeated calls differ and a
  rerun of the same sequence of calls reproduces them. The empty prompt alone (``[""]``, the
  unconditional branch) stays exact there.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffmem.mitigators.base import InferenceMitigator, PatchedModel
from diffmem.models.model import DiffusionModel, SampleOutput


def draw_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs and platforms, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generation_keys(prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """One draw key per generation: its seed (the prompt is added by :func:`draw_seed`)."""
    return [f"generation {int(s)}" for s in seeds]


def call_keys(prompts: Sequence[str], call: int) -> list[str]:
    """One draw key per row of an ``encode_prompts`` call: the call number and the prompt's occurrence in it
    (so a prompt repeated in one call gets independent draws, and none depends on the other prompts)."""
    seen: dict[str, int] = {}
    keys = []
    for p in prompts:
        seen[p] = seen.get(p, -1) + 1
        keys.append(f"call {call} occurrence {seen[p]}")
    return keys


@dataclass
class PerGenerationMitigator(InferenceMitigator):
    """An inference mitigator whose conditioning is redrawn per generation (see the module docstring)."""

    seed: int = 0

    @abstractmethod
    def perturb(self, model: DiffusionModel, prompts: list[str], keys: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditional embeddings, unconditional embeddings or None for the exact empty prompt), one row per
        prompt; row ``i`` must depend only on ``prompts[i]``, ``keys[i]`` and ``self.seed``."""

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        mitigator = self
        calls = [0]

        class PerGeneration(PatchedModel):
            def encode_prompts(self, prompts, batch_size: int = 256, **kwargs):  # kwargs: e.g. warn_truncation
                prompts = list(prompts)
                if prompts == [""]:
                    return model.encode_prompts(prompts, batch_size, **kwargs)
                calls[0] += 1
                return mitigator.perturb(model, prompts, call_keys(prompts, calls[0]))[0]

            def sample(self, prompts=None, seeds=None, *, embeddings=None, uncond_embeddings=None,
                       **kwargs) -> SampleOutput:
                if embeddings is None and prompts is not None:
                    prompts = list(prompts)
                    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
                    if len(seeds) != len(prompts):
                        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed "
                                         "per prompt")
                    embeddings, uncond_embeddings = mitigator.perturb(model, prompts,
                                                                      generation_keys(prompts, seeds))
                return super().sample(seeds=seeds, embeddings=embeddings, uncond_embeddings=uncond_embeddings,
                                      **kwargs)

        return PerGeneration.of(model)
