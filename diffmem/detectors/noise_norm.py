"""Noise-prediction magnitude (Wen et al., "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024).

    d_t(c) = || eps(x_t, c) - eps(x_t, "") ||_2

Memorized prompts pull the prediction hard towards one image, so the text-conditional guidance is
large already at the first step. ``first_step`` mode (default, the paper's headline): x_t = x_T, the
first timestep of a 50-step DDIM schedule, averaged over ``n`` shared noise draws. ``trajectory``
mode: the mean of d_t over the first ``steps`` steps of real CFG sampling (DDIM 50, guidance 7.5),
averaged over ``generations`` per prompt with seeds ``seed + j`` (their notebook: 4 generations).
No normalisation, as in the paper.

On models that predict v (SD 2.x) or x0, Wen et al.'s code takes the norm of the raw UNet outputs'
difference (``output="raw"``, the default): ``v_c - v_u = (eps_c - eps_u) / sqrt(alpha_bar_t)`` (the x_t
terms cancel), so the first step differs from the epsilon form by a constant factor but the trajectory's
per-step weights change (Spearman 0.94-0.97 between the two on SD2, issue #28). ``output="epsilon"`` takes
the norm on epsilon converted from the output. On epsilon models both are the same number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.detectors.base import DETECTORS, NoiseStepDetector, PromptDetector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine

OUTPUTS = ("raw", "epsilon")


def guidance_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """|| eps_c - eps_u ||_2 over all but the leading dimensions (C, H, W)."""
    return (eps_cond - eps_uncond).flatten(-3).norm(dim=-1)


def raw_difference_factor(prediction_type: str, alpha_bar: float) -> float:
    """``||raw_c - raw_u|| / ||eps_c - eps_u||`` at one timestep for the same latents: 1 for epsilon models,
    ``1 / sqrt(a)`` for v-prediction, ``sqrt(1 - a) / sqrt(a)`` for x0-prediction (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return 1.0
    if prediction_type == "v_prediction":
        return 1.0 / alpha_bar**0.5
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output {output!r} unknown; choose one of {OUTPUTS}")


@DETECTORS.register("noise-norm", "wen")
@dataclass
class NoiseNorm(NoiseStepDetector):
    """First-step noise-norm at x_T, mean over the engine's shared draws."""

    name = "noise-norm"
    output: str = "raw"  # "raw": the UNet's own output, as Wen's code; "epsilon": converted first

    def __post_init__(self) -> None:
        check_output(self.output)

    def timestep_indices(self) -> tuple[int, ...]:
        return (0,)

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        if self.output == "raw":
            raw_u, raw_c = batch.raw_outputs(0)
            return guidance_norm(raw_c, raw_u).mean(dim=1)
        return guidance_norm(batch.eps_cond[0], batch.uncond(0)).mean(dim=1)


@DETECTORS.register("noise-norm-trajectory", "wen-trajectory")
@dataclass
class NoiseNormTrajectory(PromptDetector):
    """Mean noise-norm over the first ``steps`` CFG sampling steps of ``generations`` generations."""

    name = "noise-norm-trajectory"
    steps: int = 50
    generations: int = 4
    guidance_scale: float = 7.5
    seed_offset: int = 0
    output: str = "raw"  # as NoiseNorm.output

    def __post_init__(self) -> None:
        check_output(self.output)

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        b, g = len(embeddings), self.generations
        emb = embeddings.repeat_interleave(g, 0)
        sampler = model.make_sampler(engine.schedule_steps)
        if engine.seed_per_prompt:  # Wen et al.: one generator per prompt, seeded by its index, draws its generations
            x = engine.draws_per_prompt(prompt_ids, g, self.seed_offset).flatten(0, 1)
        else:
            x = model.initial_latents(engine.generation_seeds(b, g, self.seed_offset))
        x = x * sampler.init_noise_sigma
        kind = model.prediction_type if self.output == "raw" else "epsilon"
        norms = [guidance_norm(step.eps_cond.float(), step.eps_uncond.float())
                 * raw_difference_factor(kind, float(model.alphas_cumprod[step.timestep]))
                 for step in model.denoise(emb, x, sampler, self.guidance_scale, max_steps=self.steps)]
        engine.unet_calls += 2 * len(norms) * len(emb)
        return torch.stack(norms, 1).mean(1).view(b, g).mean(1)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        return float(2 * min(self.steps, engine.schedule_steps) * self.generations)
