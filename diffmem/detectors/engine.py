"""The shared noise-step forward pass behind every x_T detector.

For ``n_draws`` noise draws x_T^j (shared by all prompts, seeded) and each DDIM-schedule timestep
that some detector needs, the engine computes the unconditional prediction eps(x_T^j, t, "") once per
draw and caches it, and the conditional predictions eps(x_T^j, t, c_b) for a whole batch of prompts in
batched UNet calls. No per-prompt Python loop runs on the hot path; detectors only do tensor algebra
on the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.models.model import DiffusionModel, check_finite


@dataclass
class NoiseStepBatch:
    """Predictions at x_T for ``B`` prompts and ``D`` shared draws, keyed by schedule index."""

    latents: torch.Tensor  # (D, C, H, W)
    eps_uncond: dict[int, torch.Tensor]  # index -> (D, C, H, W)
    eps_cond: dict[int, torch.Tensor]  # index -> (B, D, C, H, W)
    timesteps: dict[int, int]  # index -> timestep value

    def guidance(self, index: int) -> torch.Tensor:
        """eps_c - eps_u, ``(B, D, C, H, W)``."""
        return self.eps_cond[index] - self.eps_uncond[index][None]


class NoiseStepEngine:
    """Shared x_T draws, a DDIM schedule, a cache of unconditional predictions, batched conditionals."""

    def __init__(self, model: DiffusionModel, n_draws: int = 8, seed: int = 0, schedule_steps: int = 50,
                 max_unet_batch: int = 512):
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        self.model, self.n_draws, self.seed, self.schedule_steps = model, n_draws, seed, schedule_steps
        self.max_unet_batch = max_unet_batch
        self.sampler = model.make_sampler(schedule_steps)
        self.latents = model.initial_latents([seed + j for j in range(n_draws)]) * self.sampler.init_noise_sigma
        self._uncond: dict[int, torch.Tensor] = {}
        self.unet_calls = 0  # batch elements pushed through the UNet, for cost accounting

    def timestep(self, index: int) -> int:
        return int(self.sampler.timesteps[index])

    @torch.no_grad()
    def uncond(self, index: int) -> torch.Tensor:
        if index not in self._uncond:
            eps = self.model.predict_noise(self.latents, self.timestep(index), self.model.empty_embedding())
            self._uncond[index] = check_finite(eps.float(), f"unconditional prediction of {self.model.source}")
            self.unet_calls += self.n_draws
        return self._uncond[index]

    @torch.no_grad()
    def cond(self, embeddings: torch.Tensor, index: int) -> torch.Tensor:
        """eps(x_T^j, t, c_b) for every prompt b and draw j: ``(B, D, C, H, W)``, in chunks of the UNet batch."""
        b, d = len(embeddings), self.n_draws
        t = self.timestep(index)
        per_call = max(1, self.max_unet_batch // d)
        out = []
        for start in range(0, b, per_call):
            emb = embeddings[start : start + per_call]
            lat = self.latents.repeat(len(emb), 1, 1, 1)
            eps = self.model.predict_noise(lat, t, emb.repeat_interleave(d, 0))
            out.append(eps.float().view(len(emb), d, *eps.shape[1:]))
            self.unet_calls += len(emb) * d
        return torch.cat(out)  # NaN rows are kept: the scan reports them per prompt instead of dying

    def run(self, embeddings: torch.Tensor, indices: set[int]) -> NoiseStepBatch:
        """All predictions the given schedule indices need, for one batch of prompt embeddings."""
        return NoiseStepBatch(
            latents=self.latents,
            eps_uncond={i: self.uncond(i) for i in indices},
            eps_cond={i: self.cond(embeddings, i) for i in indices},
            timesteps={i: self.timestep(i) for i in indices},
        )
