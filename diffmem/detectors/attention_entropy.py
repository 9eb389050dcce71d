"""Cross-attention entropy (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
Diffusion Models through Cross Attention", ECCV 2024).

For the conditional branch at the first step (x_T, timesteps[0] of DDIM-50), read the cross-attention
probabilities of the chosen layers, average them over heads and query pixels to one distribution
``a`` over the prompt's tokens, and score its entropy

    E = - sum_i a_i log a_i,

averaged over layers and the engine's shared noise draws. Ordinary prompts put most attention on the
start-of-text token (low entropy); memorized prompts spread it over their own tokens (high entropy).
This is the paper's cheap mode (first step, one mid layer: ``layers`` is a module-name pattern).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from diffmem.detectors.base import DETECTORS, NoiseStepDetector
from diffmem.detectors.engine import NoiseStepBatch
from diffmem.errors import DiffmemError


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis (nats) of distributions ``(..., tokens)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@DETECTORS.register("attention-entropy", "ren")
@dataclass
class AttentionEntropy(NoiseStepDetector):
    """Entropy of the query- and head-averaged cross-attention over tokens at x_T (conditional branch),
    read by the engine during its own conditional pass (no extra UNet call)."""

    name = "attention-entropy"
    layers: str = r"mid_block\..*attn2$"

    def timestep_indices(self) -> tuple[int, ...]:
        return (0,)

    def attention_layers(self) -> str | None:
        return self.layers

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        rx = re.compile(self.layers)
        per_layer = [token_entropy(a) for name, a in batch.attention.get(0, {}).items() if rx.search(name)]  # (B, D)
        if not per_layer:
            raise DiffmemError(f"the engine recorded no cross-attention layers matching {self.layers!r}")
        return torch.stack(per_layer).mean(0).mean(1)
