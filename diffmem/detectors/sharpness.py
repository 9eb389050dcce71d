"""Sharpness of the conditional score (Jeon et al., "Understanding and Mitigating Memorization in
Diffusion Models for Tabular and Image Data via Sharpness", ICML 2025).

With the score ``s(x, c) = -eps(x, t, c) / sqrt(1 - alpha_bar_t)`` and its Hessian-like Jacobian
``H(x, c) = d s / d x``, the first-step sharpness difference on the pure-noise latent x_T is

    S(c) = || (H_c - H_u) (s_c - s_u) ||_2,

one forward-mode Jacobian-vector product of ``x -> s_c(x) - s_u(x)`` along its own value
(``torch.func.jvp`` through both CFG branches in one batched call; math attention kernel, which
supports forward-mode AD). Memorized prompts sit in sharp, narrow modes: the conditional score bends
far more than the unconditional one. Averaged over the engine's shared noise draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffmem.detectors.base import DETECTORS, PromptDetector
from diffmem.detectors.engine import NoiseStepEngine


def score_difference_jvp(model, latents: torch.Tensor, t: int, embeddings: torch.Tensor, alpha_bar: float,
                         guidance: torch.Tensor) -> torch.Tensor:
    """(H_c - H_u)(s_c - s_u) at ``latents`` for per-row ``embeddings``, ``(N, C, H, W)``; ``guidance`` is
    eps_c - eps_u at ``latents``, already computed by the engine's x_T pass."""
    scale = -1.0 / (1.0 - alpha_bar) ** 0.5

    def score_difference(x: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = model.guided_pair(x, t, embeddings)
        return (eps_c.float() - eps_u.float()) * scale

    with sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(score_difference, (latents,), (guidance.float() * scale,))
    return jvp


@DETECTORS.register("sharpness", "jeon")
@dataclass
class Sharpness(PromptDetector):
    """``|| (H_c - H_u)(s_c - s_u) ||`` at x_T and the first DDIM-50 timestep, mean over shared draws."""

    name = "sharpness"

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        b, d = len(embeddings), engine.n_draws
        t = engine.timestep(0)
        alpha_bar = float(engine.sampler.alphas_cumprod[t])
        batch = engine.run(embeddings, {0}, prompt_ids=prompt_ids)  # the engine's x_T pass (shared with noise-norm)
        guidance, latents = batch.guidance(0), batch.x_T()
        per_call = max(1, engine.max_unet_batch // (4 * d))
        out = []
        for start in range(0, b, per_call):
            emb = embeddings[start : start + per_call]
            x = latents[start : start + per_call].flatten(0, 1)
            direction = guidance[start : start + per_call].flatten(0, 1)
            jvp = score_difference_jvp(model, x, t, emb.repeat_interleave(d, 0), alpha_bar, direction)
            out.append(jvp.flatten(1).norm(dim=1).view(len(emb), d).mean(1))
            engine.unet_calls += 2 * len(emb) * d
        return torch.cat(out)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        """The engine's conditional pass at x_T (1 per draw, shared with noise-norm; the unconditional one is
        shared by all prompts) plus the JVP, a dual forward through both branches (2 per draw)."""
        return float(3 * engine.n_draws)
