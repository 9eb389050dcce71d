"""Gaussian noise on text embeddings (Somepalli et al., "Understanding and Mitigating Copying in
Diffusion Models", NeurIPS 2023): at inference, e' = e + lambda * std(e) * N(0, I).

The simplest inference-time baseline: it blurs the exact conditioning a memorized prompt keys on.
Noise is seeded per prompt text, so a prompt always gets the same perturbation (deterministic runs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from diffmem.mitigators.base import MITIGATORS, InferenceMitigator, PatchedModel
from diffmem.models.model import DiffusionModel


def text_seed(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:4], "little")


@MITIGATORS.register("embedding-noise", "somepalli-noise")
@dataclass
class EmbeddingNoise(InferenceMitigator):
    """Add ``scale`` x (embedding std) Gaussian noise to each prompt's text embedding."""

    name = "embedding-noise"
    scale: float = 0.1
    seed: int = 0

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        mitigator = self
        original = model.encode_prompts

        class NoisyEmbeddings(PatchedModel):
            def encode_prompts(self, prompts, batch_size: int = 256, **kwargs):  # kwargs: e.g. warn_truncation
                emb = original(prompts, batch_size, **kwargs)
                if list(prompts) == [""]:
                    return emb  # the unconditional branch stays exact
                noise = torch.stack([torch.randn(emb.shape[1:], generator=torch.Generator().manual_seed(
                    text_seed(p, mitigator.seed))) for p in prompts]).to(emb)
                return emb + mitigator.scale * emb.std() * noise

        return NoisyEmbeddings.of(model)
