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

from dataclasses import dataclass

import torch

from diffmem.detectors.base import DETECTORS, PromptDetector
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.models.attention import cross_attention_probs, wrap_cross_attention


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis (nats) of distributions ``(..., tokens)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@DETECTORS.register("attention-entropy", "ren")
@dataclass
class AttentionEntropy(PromptDetector):
    """Entropy of the query- and head-averaged cross-attention over tokens at x_T (conditional branch)."""

    name = "attention-entropy"
    layers: str = r"mid_block\..*attn2$"

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine) -> torch.Tensor:
        b, d = len(embeddings), engine.n_draws
        entropies: dict[str, list[torch.Tensor]] = {}

        def record(name, attn, inner, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            probs = cross_attention_probs(attn, hidden, context).float()  # (B*D, heads, Q, T)
            entropies.setdefault(name, []).append(token_entropy(probs.mean((1, 2))))
            return inner(attn, *args, **kwargs)

        with wrap_cross_attention(model.unet, self.layers, record):
            engine.cond(embeddings, 0)  # the engine's batched conditional pass at x_T
        per_layer = torch.stack([torch.cat(chunks) for chunks in entropies.values()])  # (layers, B * D)
        return per_layer.mean(0).view(b, d).mean(1)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        return float(engine.n_draws)
