"""One-step white-box attack (Webster, "A Reproducible Extraction of Training Images from Diffusion
Models", 2023).

Run a single guided DDIM step from the initial noise x_T (a one-step schedule: the step's output is
the model's clean-latent estimate) and score

    s = mean over seeds of  mean_{pixels} ( x_T * sigma_init - x_out )^2

A memorized prompt makes the model snap to one image in a single step, far from the noise it started
from; an ordinary prompt's one-step output stays a blurry average near the noise scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.attacks.base import ATTACKS, Attack, AttackContext


@ATTACKS.register("one-step-whitebox", "webster-whitebox")
@dataclass
class OneStepWhiteBox(Attack):
    """MSE between the scaled initial noise and the latent after one guided step."""

    name = "one-step-whitebox"
    needs_white_box = True
    seeds: int = 4
    guidance_scale: float = 7.5
    threshold: float | None = None  # flag above this score (None: no flag, scores only)

    @torch.no_grad()
    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        k = self.seeds
        emb = model.encode_prompts(prompts).repeat_interleave(k, 0)
        sampler = model.make_sampler(1)
        x = model.initial_latents([ctx.seed + j for _ in prompts for j in range(k)]) * sampler.init_noise_sigma
        step = next(model.denoise(emb, x, sampler, self.guidance_scale))
        mse = (x - step.next_latents).pow(2).flatten(1).mean(1).view(len(prompts), k).mean(1).double().numpy()
        flagged = [bool(s > self.threshold) if self.threshold is not None else False for s in mse]
        return {"score": mse, "flagged": flagged}

    def unet_calls_per_prompt(self) -> float:
        return float(2 * self.seeds)
