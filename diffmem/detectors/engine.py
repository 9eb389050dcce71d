"""The shared noise-step forward pass behind every x_T detector.

For ``n_draws`` noise draws x_T^j and each DDIM-schedule timestep that some detector needs, the engine
computes the conditional predictions eps(x_T^j, t, c_b) for a whole batch of prompts in batched UNet
calls, and the unconditional eps(x_T^j, t, ""). No per-prompt Python loop runs on the hot path;
detectors only do tensor algebra on the result. Two seeding conventions:

- shared draws (default): the same draws x_T^j = N(0, I) seeded ``seed + j`` for every prompt, so the
  unconditional prediction is computed once per draw and cached, and prompts are compared on the same
  noise;
- ``seed_per_prompt`` (Wen et al.'s convention): prompt ``i`` (its index in the prompt file) gets its
  own draws, the first ``n_draws`` samples of a generator seeded ``seed + i`` (as their pipeline draws
  its generations from one seed per prompt); the unconditional prediction is then computed per prompt.

Either way a prompt's score does not depend on which other prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from diffmem.models.attention import cross_attention_probs, wrap_cross_attention
from diffmem.models.model import DiffusionModel, check_finite


@dataclass
class NoiseStepBatch:
    """Predictions at x_T for ``B`` prompts and ``D`` draws, keyed by schedule index.

    ``latents`` and ``eps_uncond`` are ``(D, C, H, W)`` with shared draws and ``(B, D, C, H, W)`` with a seed
    per prompt; :meth:`x_T` and :meth:`uncond` give both as ``(B, D, C, H, W)``.
    """

    latents: torch.Tensor
    eps_uncond: dict[int, torch.Tensor]  # index -> (D, C, H, W) or (B, D, C, H, W)
    eps_cond: dict[int, torch.Tensor]  # index -> (B, D, C, H, W)
    timesteps: dict[int, int]  # index -> timestep value
    # index -> layer name -> head- and query-averaged cross-attention over tokens, (B, D, T); only for the
    # layers some detector asked for (``attention_layers``), recorded during the conditional pass itself
    attention: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    prediction_type: str = "epsilon"  # what the UNet outputs: epsilon, v_prediction or sample
    alphas_cumprod: dict[int, float] = field(default_factory=dict)  # index -> alpha_bar of that timestep

    def _per_prompt(self, tensor: torch.Tensor) -> torch.Tensor:
        b = len(next(iter(self.eps_cond.values())))
        return tensor if tensor.ndim == 5 else tensor[None].expand(b, *tensor.shape)

    def x_T(self) -> torch.Tensor:
        """The draws each prompt saw, ``(B, D, C, H, W)``."""
        return self._per_prompt(self.latents.float())

    def uncond(self, index: int) -> torch.Tensor:
        """eps_u at each prompt's draws, ``(B, D, C, H, W)``."""
        return self._per_prompt(self.eps_uncond[index])

    def guidance(self, index: int) -> torch.Tensor:
        """eps_c - eps_u, ``(B, D, C, H, W)``."""
        return self.eps_cond[index] - self.uncond(index)

    def raw_outputs(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) UNet outputs in the model's own parameterisation, both ``(B, D, C, H, W)``,
        recovered from epsilon by inverting the model layer's conversion (Salimans & Ho 2022):
        v = (eps - sqrt(1 - a) x_T) / sqrt(a), x0 = (x_T - sqrt(1 - a) eps) / sqrt(a), with a = alpha_bar_t."""
        eps_u, eps_c = self.uncond(index), self.eps_cond[index]
        if self.prediction_type == "epsilon":
            return eps_u, eps_c
        a = torch.tensor(self.alphas_cumprod[index], dtype=torch.float64)
        sa, s1 = float(a.sqrt()), float((1 - a).sqrt())
        x = self.x_T()
        if self.prediction_type == "v_prediction":
            return (eps_u - s1 * x) / sa, (eps_c - s1 * x) / sa
        return (x - s1 * eps_u) / sa, (x - s1 * eps_c) / sa


class NoiseStepEngine:
    """x_T draws (shared or per prompt), a DDIM schedule, a cache of unconditional predictions, batched conditionals."""

    def __init__(self, model: DiffusionModel, n_draws: int = 8, seed: int = 0, schedule_steps: int = 50,
                 max_unet_batch: int = 512, seed_per_prompt: bool = False):
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        self.model, self.n_draws, self.seed, self.schedule_steps = model, n_draws, seed, schedule_steps
        self.max_unet_batch, self.seed_per_prompt = max_unet_batch, seed_per_prompt
        self.sampler = model.make_sampler(schedule_steps)
        # the shared draws (with seed_per_prompt they only serve as a probe input, e.g. to order the UNet's layers)
        self.latents = model.initial_latents([seed + j for j in range(n_draws)]) * self.sampler.init_noise_sigma
        self._uncond: dict[int, torch.Tensor] = {}
        self.unet_calls = 0  # batch elements pushed through the UNet, for cost accounting
        # predictions of the last batch: index -> (eps_cond, attention, the attention pattern recorded, eps_uncond)
        self._cached_for: tuple[torch.Tensor | None, tuple[int, ...] | None] = (None, None)
        self._cached: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor], str | None, torch.Tensor | None]] = {}
        self._batch_latents: torch.Tensor | None = None

    def _prompt_ids(self, n_prompts: int, prompt_ids: Sequence[int] | None) -> list[int] | None:
        if prompt_ids is not None and len(prompt_ids) != n_prompts:
            raise ValueError(f"got {n_prompts} prompts but {len(prompt_ids)} prompt ids")
        if self.seed_per_prompt and prompt_ids is None:
            raise ValueError("seed_per_prompt draws each prompt's noise from its index: pass prompt_ids")
        return None if prompt_ids is None else [int(i) for i in prompt_ids]

    def draws_per_prompt(self, prompt_ids: Sequence[int], per_prompt: int, offset: int = 0) -> torch.Tensor:
        """Unit-variance noise of ``per_prompt`` draws for each prompt, ``(B, per_prompt, C, H, W)``: the first
        samples of a CPU generator seeded ``offset + seed + prompt id`` (the same noise on every device)."""
        shape = self.model.latent_shape
        return torch.stack([torch.randn((per_prompt, *shape), generator=torch.Generator().manual_seed(
            int(offset + self.seed + i))) for i in prompt_ids]).to(self.model.device, torch.float32)

    def generation_seeds(self, n_prompts: int, per_prompt: int, offset: int = 0,
                         prompt_ids: Sequence[int] | None = None) -> list[int]:
        """Seeds of ``per_prompt`` generations for each of ``n_prompts`` prompts, prompt-major, moved by the scan's
        seed and ``offset``. Shared draws: the same seeds ``j`` for every prompt (a fair comparison across
        prompts; with offset 0 they are the engine's own x_T draws). ``seed_per_prompt``: prompt ``i``'s
        generations get seeds ``i * per_prompt + j``, set by its index alone and distinct across prompts."""
        ids = self._prompt_ids(n_prompts, prompt_ids)
        if self.seed_per_prompt:
            return [offset + self.seed + i * per_prompt + j for i in ids for j in range(per_prompt)]
        return [offset + self.seed + j for _ in range(n_prompts) for j in range(per_prompt)]

    def timestep(self, index: int) -> int:
        return int(self.sampler.timesteps[index])

    @torch.no_grad()
    def uncond(self, index: int) -> torch.Tensor:
        """eps(x_T^j, t, "") of the shared draws, ``(D, C, H, W)``, computed once per index."""
        if index not in self._uncond:
            eps = self.model.predict_noise(self.latents, self.timestep(index), self.model.empty_embedding())
            self._uncond[index] = check_finite(eps.float(), f"unconditional prediction of {self.model.source}")
            self.unet_calls += self.n_draws
        return self._uncond[index]

    @torch.no_grad()
    def _uncond_per_prompt(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """eps(x, t, "") for per-prompt draws ``(B, D, C, H, W)`` in chunks of the UNet batch."""
        flat = latents.flatten(0, 1)
        out = [self.model.predict_noise(flat[s : s + self.max_unet_batch], self.timestep(index),
                                        self.model.empty_embedding()).float()
               for s in range(0, len(flat), self.max_unet_batch)]
        self.unet_calls += len(flat)
        eps = check_finite(torch.cat(out), f"unconditional prediction of {self.model.source}")
        return eps.view(latents.shape)

    @torch.no_grad()
    def cond(self, embeddings: torch.Tensor, index: int, attention_layers: str | None = None,
             latents: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eps(x_T^j, t, c_b) for every prompt b and draw j: ``(B, D, C, H, W)``, in chunks of the UNet batch,
        and the averaged cross-attention of the layers matching ``attention_layers`` (``{}`` when None).
        ``latents``: per-prompt draws ``(B, D, C, H, W)`` (default: the shared draws)."""
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
                lat = (self.latents.repeat(len(emb), 1, 1, 1) if latents is None
                       else latents[start : start + per_call].flatten(0, 1))
                eps = self.model.predict_noise(lat, t, emb.repeat_interleave(d, 0))
                out.append(eps.float().view(len(emb), d, *eps.shape[1:]))
                self.unet_calls += len(emb) * d
        attention = {name: torch.cat(chunks).view(b, d, -1) for name, chunks in recorded.items()}
        return torch.cat(out), attention  # NaN rows are kept: the scan reports them per prompt instead of dying

    def run(self, embeddings: torch.Tensor, indices: set[int], attention_layers: str | None = None,
            prompt_ids: Sequence[int] | None = None) -> NoiseStepBatch:
        """All predictions the given schedule indices need, for one batch of prompt embeddings.

        ``prompt_ids`` (the prompts' indices in their file) are needed with ``seed_per_prompt``. The predictions
        of the last batch are kept: a detector that needs them again for the same ``embeddings`` tensor object,
        unmodified, and the same ids (e.g. sharpness, for its JVP direction), gets them without a UNet call.
        """
        ids = self._prompt_ids(len(embeddings), prompt_ids)
        key = (embeddings, tuple(ids) if self.seed_per_prompt else None)
        if self._cached_for[0] is not key[0] or self._cached_for[1] != key[1]:
            self._cached_for, self._cached = key, {}
            self._batch_latents = (self.draws_per_prompt(ids, self.n_draws) * self.sampler.init_noise_sigma
                                   if self.seed_per_prompt else None)
        shared_uncond = {} if self.seed_per_prompt else {i: self.uncond(i) for i in sorted(indices)}
        for i in sorted(indices):
            hit = self._cached.get(i)
            if hit is None or (attention_layers is not None and hit[2] != attention_layers):
                eps, attention = self.cond(embeddings, i, attention_layers, self._batch_latents)
                eps_u = hit[3] if hit is not None else (
                    self._uncond_per_prompt(self._batch_latents, i) if self.seed_per_prompt else None)
                self._cached[i] = (eps, attention, attention_layers, eps_u)
        return NoiseStepBatch(latents=self._batch_latents if self.seed_per_prompt else self.latents,
                              eps_uncond=shared_uncond or {i: self._cached[i][3] for i in indices},
                              eps_cond={i: self._cached[i][0] for i in indices},
                              timesteps={i: self.timestep(i) for i in indices},
                              attention={i: self._cached[i][1] for i in indices} if attention_layers else {},
                              prediction_type=self.model.prediction_type,
                              alphas_cumprod={i: float(self.model.alphas_cumprod[self.timestep(i)]) for i in indices})
