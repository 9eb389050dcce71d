"""The shared noise-step forward pass behind every x_T detector.

For ``n_draws`` noise draws x_T^j (shared by all prompts, seeded) and each DDIM-schedule timestep
that some detector needs, the engine computes the unconditional prediction eps(x_T^j, t, "") once per
draw and caches it, and the conditional predictions eps(x_T^j, t, c_b) for a whole batch of prompts in
batched UNet calls. No per-prompt Python loop runs on the hot path; detectors only do tensor algebra
on the result.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from diffmem.models.attention import cross_attention_probs, wrap_cross_attention
from diffmem.models.model import DiffusionModel, check_finite


@dataclass
class NoiseStepBatch:
    """Predictions at x_T for ``B`` prompts and ``D`` shared draws, keyed by schedule index."""

    latents: torch.Tensor  # (D, C, H, W)
    eps_uncond: dict[int, torch.Tensor]  # index -> (D, C, H, W)
    eps_cond: dict[int, torch.Tensor]  # index -> (B, D, C, H, W)
    timesteps: dict[int, int]  # index -> timestep value
    # index -> layer name -> head- and query-averaged cross-attention over tokens, (B, D, T); only for the
    # layers some detector asked for (``attention_layers``), recorded during the conditional pass itself
    attention: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    prediction_type: str = "epsilon"  # what the UNet outputs: epsilon, v_prediction or sample
    alphas_cumprod: dict[int, float] = field(default_factory=dict)  # index -> alpha_bar of that timestep

    def guidance(self, index: int) -> torch.Tensor:
        """eps_c - eps_u, ``(B, D, C, H, W)``."""
        return self.eps_cond[index] - self.eps_uncond[index][None]

    def raw_outputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional ``(D, C, H, W)``, conditional ``(B, D, C, H, W)``) UNet outputs in the model's own
        parameterisation, recovered from epsilon by inverting the model layer's conversion (Salimans & Ho 2022):
        v = (eps - sqrt(1 - a) x_T) / sqrt(a), x0 = (x_T - sqrt(1 - a) eps) / sqrt(a), with a = alpha_bar_t."""
        eps_u, eps_c = self.eps_uncond[index], self.eps_cond[index]
        if self.prediction_type == "epsilon":
            return eps_u, eps_c
        a = torch.tensor(self.alphas_cumprod[index], dtype=torch.float64)
        sa, s1 = float(a.sqrt()), float((1 - a).sqrt())
        x = self.latents.float()
        if self.prediction_type == "v_prediction":
            return (eps_u - s1 * x) / sa, (eps_c - s1 * x[None]) / sa
        return (x - s1 * eps_u) / sa, (x[None] - s1 * eps_c) / sa


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
        # conditional predictions of the last batch: index -> (eps, attention, the attention pattern recorded)
        self._cached_for: torch.Tensor | None = None
        self._cached: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor], str | None]] = {}

    def generation_seeds(self, n_prompts: int, per_prompt: int, offset: int = 0) -> list[int]:
        """Seeds of ``per_prompt`` generations for each of ``n_prompts`` prompts, prompt-major: the same
        seeds for every prompt (a fair comparison across prompts), moved by the scan's seed and ``offset``."""
        return [offset + self.seed + j for _ in range(n_prompts) for j in range(per_prompt)]

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
    def cond(self, embeddings: torch.Tensor, index: int, attention_layers: str | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eps(x_T^j, t, c_b) for every prompt b and draw j: ``(B, D, C, H, W)``, in chunks of the UNet batch,
        and the averaged cross-attention of the layers matching ``attention_layers`` (``{}`` when None)."""
        b, d = len(embeddings), self.n_draws
        t = self.timestep(index)
        per_call = max(1, self.max_unet_batch // d)
        recorded: dict[str, list[torch.Tensor]] = {}

        def record(name, attn, inner, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            probs = cross_attention_probs(attn, hidden, context).float()  # (N, heads, Q, T)
            recorded.setdefault(name, []).append(probs.mean((1, 2)))
            return inner(attn, *args, **kwargs)

        out = []
        with wrap_cross_attention(self.model.unet, attention_layers, record) if attention_layers else nullcontext():
            for start in range(0, b, per_call):
                emb = embeddings[start : start + per_call]
                lat = self.latents.repeat(len(emb), 1, 1, 1)
                eps = self.model.predict_noise(lat, t, emb.repeat_interleave(d, 0))
                out.append(eps.float().view(len(emb), d, *eps.shape[1:]))
                self.unet_calls += len(emb) * d
        attention = {name: torch.cat(chunks).view(b, d, -1) for name, chunks in recorded.items()}
        return torch.cat(out), attention  # NaN rows are kept: the scan reports them per prompt instead of dying

    def run(self, embeddings: torch.Tensor, indices: set[int], attention_layers: str | None = None) -> NoiseStepBatch:
        """All predictions the given schedule indices need, for one batch of prompt embeddings.

        The conditional predictions of the last batch are kept: a detector that needs them again for the
        same ``embeddings`` tensor object, unmodified (e.g. sharpness, for its JVP direction), gets them without a
        UNet call.
        """
        if self._cached_for is not embeddings:
            self._cached_for, self._cached = embeddings, {}
        eps_uncond = {i: self.uncond(i) for i in sorted(indices)}
        for i in sorted(indices):
            hit = self._cached.get(i)
            if hit is None or (attention_layers is not None and hit[2] != attention_layers):
                eps, attention = self.cond(embeddings, i, attention_layers)
                self._cached[i] = (eps, attention, attention_layers)
        return NoiseStepBatch(latents=self.latents, eps_uncond=eps_uncond,
                              eps_cond={i: self._cached[i][0] for i in indices},
                              timesteps={i: self.timestep(i) for i in indices},
                              attention={i: self._cached[i][1] for i in indices} if attention_layers else {},
                              prediction_type=self.model.prediction_type,
                              alphas_cumprod={i: float(self.model.alphas_cumprod[self.timestep(i)]) for i in indices})
