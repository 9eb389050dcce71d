"""Gaussian noise on text embeddings (Somepalli et al., "Understanding and Mitigating Copying in
Diffusion Models", NeurIPS 2023; code: somepago/DCR), as its authors run it:

    e' = e + lambda * N(0, I),   lambda = 0.1 (absolute, not relative to the embedding's spread)

added to both halves of classifier-free guidance (DCR ``diff_inference.py`` L3-6: ``_encode_prompt``
returns ``embedding + self.noiselam * torch.randn_like(embedding)`` on the concatenated unconditional and
conditional embeddings; lambda from ``--rand_noise_lam``, L216, run at 0.1 in the paper), drawn once per
pipeline call, i.e. fresh for every generation and held over its denoising steps. diffmem seeds each
generation's draw from its seed (see :mod:`diffmem.mitigators.per_generation`): deterministic, and a prompt
gets the same noise alone as inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.mitigators.base import MITIGATORS
from diffmem.mitigators.per_generation import PerGenerationMitigator, draw_seed
from diffmem.models.model import DiffusionModel


def gaussian_rows(shape: torch.Size | tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, drawn on CPU (the same on every device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@MITIGATORS.register("embedding-noise", "somepalli-noise")
@dataclass
class EmbeddingNoise(PerGenerationMitigator):
    """Add ``scale`` x N(0, I) to both CFG halves' text embeddings, redrawn for every generation."""

    name = "embedding-noise"
    scale: float = 0.1  # DCR diff_inference.py L6 (noiselam), 0.1 in Somepalli et al. 2023

    def perturb(self, model: DiffusionModel, prompts: list[str], keys: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cond = model.encode_prompts(prompts)
        empty = model.empty_embedding()
        shape = cond.shape[1:]
        noise_c = gaussian_rows(shape, [draw_seed(self.seed, k, p, "cond") for p, k in zip(prompts, keys)])
        noise_u = gaussian_rows(shape, [draw_seed(self.seed, k, p, "uncond") for p, k in zip(prompts, keys)])
        return (cond + self.scale * noise_c.to(cond)), (empty + self.scale * noise_u.to(empty))
