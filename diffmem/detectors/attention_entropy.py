"""Cross-attention entropy (Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
Diffusion Models through Cross Attention", ECCV 2024).

For the conditional branch at the first step (x_T, timesteps[0] of DDIM-50), read the cross-attention
probabilities ``A^{l,h}_{q,i}`` (layer l, head h, query pixel q, token i) of the chosen layers, average
them over layers, heads and query pixels to one distribution over the prompt's tokens,

    a_i = mean_{l, h, q} A^{l,h}_{q,i},      E = - sum_i a_i log a_i,

and average E over the engine's noise draws. Ordinary prompts put most attention on the
start-of-text token (low entropy); memorized prompts spread it over their own tokens (high entropy).

Default = the paper's cheap mode: one layer, the 4th cross-attention layer in *forward* order (found
by running the UNet once: ``down_blocks.1.attentions.1`` on SD1.x; on the zoo's smaller UNet it is
``up_blocks.1.attentions.0``), attention averaged before the entropy. Options:

- ``layer_number``: which cross-attention layer in forward order (1-based) when ``layers`` is unset;
- ``layers``: a module-name pattern instead (e.g. ``r"mid_block\\..*attn2$"``, diffmem's former default,
  or ``"attn2$"`` for every layer);
- ``reduce="entropy"``: average the per-layer entropies instead of the attention (diffmem's former
  reduction; the two agree for a single layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from diffmem.detectors.base import DETECTORS, NoiseStepDetector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine
from diffmem.errors import DiffmemError
from diffmem.models.attention import cross_attention_forward_order

REDUCTIONS = ("attention", "entropy")


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis (nats) of distributions ``(..., tokens)``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def nth_cross_attention_layer(engine: NoiseStepEngine, number: int) -> str:
    """Name of the ``number``-th (1-based) cross-attention module in the UNet's forward order."""
    model = engine.model
    order = cross_attention_forward_order(
        model.unet, lambda: model.predict_noise(engine.latents[:1], engine.timestep(0), model.empty_embedding()))
    if not 1 <= number <= len(order):
        raise DiffmemError(f"attention-entropy: layer_number {number} asked for, but the UNet has {len(order)} "
                           f"cross-attention layers ({', '.join(order)})")
    return order[number - 1]


@DETECTORS.register("attention-entropy", "ren")
@dataclass
class AttentionEntropy(NoiseStepDetector):
    """Entropy over tokens of the cross-attention averaged over layers, heads and query pixels at x_T
    (conditional branch), read by the engine during its own conditional pass (no extra UNet call)."""

    name = "attention-entropy"
    layer_number: int = 4
    layers: str | None = None
    reduce: str = "attention"
    _resolved: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"attention-entropy reduce {self.reduce!r} unknown; expected one of {list(REDUCTIONS)}")
        if self.layer_number < 1:
            raise ValueError(f"attention-entropy layer_number must be >= 1, got {self.layer_number}")

    def timestep_indices(self) -> tuple[int, ...]:
        return (0,)

    def attention_layers(self, engine: NoiseStepEngine) -> str | None:
        if self.layers is not None:
            return self.layers
        if self._resolved is None:
            self._resolved = re.escape(nth_cross_attention_layer(engine, self.layer_number)) + "$"
        return self._resolved

    def prepare(self, engine: NoiseStepEngine) -> None:
        self.attention_layers(engine)

    def config(self) -> dict:
        cfg = super().config()
        if self.layers is None and self._resolved is not None:
            cfg["resolved_layer"] = self._resolved.rstrip("$").replace("\\", "")
        return cfg

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        pattern = self.layers if self.layers is not None else self._resolved
        if pattern is None:
            raise RuntimeError("attention-entropy: the layer was not resolved; score through score_embeddings")
        rx = re.compile(pattern)
        chosen = [a for name, a in batch.attention.get(0, {}).items() if rx.search(name)]  # each (B, D, T)
        if not chosen:
            raise DiffmemError(f"the engine recorded no cross-attention layers matching {pattern!r}")
        if self.reduce == "attention":
            per_draw = token_entropy(torch.stack(chosen).mean(0))
        else:
            per_draw = torch.stack([token_entropy(a) for a in chosen]).mean(0)
        return per_draw.mean(1)
