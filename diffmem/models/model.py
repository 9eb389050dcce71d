"""One thin layer over a text-to-image diffusion model's diffusers components.

Everything else in diffmem (detectors, attacks, mitigators) talks to a model through this class:
prompt encoding, noise prediction in the epsilon parameterisation whatever the model was trained
with, the shared classifier-free-guidance forward pass, and a DDIM sampler. It works unchanged for
the zoo (a tiny latent ``StableDiffusionPipeline``) and for Stable Diffusion 1.x/2.x folders.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from diffmem.errors import NonFiniteError, PromptError

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class GuidedStep:
    """One CFG sampling step: input latents, both branches' epsilon, and the sampler's next latents."""

    index: int
    timestep: int
    latents: torch.Tensor
    eps_uncond: torch.Tensor
    eps_cond: torch.Tensor
    next_latents: torch.Tensor
    x0: torch.Tensor  # the sampler's clean-latent estimate at this step


@dataclass
class SampleOutput:
    """Images in [0, 1] as ``(N, 3, H, W)`` float32 on CPU, and the final latents."""

    images: torch.Tensor
    latents: torch.Tensor


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Raise :class:`NonFiniteError` naming ``what`` if ``tensor`` holds NaN or inf."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor.reshape(len(tensor), -1))).any(dim=1).nonzero().flatten().tolist()
        raise NonFiniteError(f"{what} contains NaN or inf values (batch rows {bad[:10]}); "
                             "try float32 or check the checkpoint")
    return tensor


def _placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype``, frozen, in eval mode. The dtype cast runs only when needed:
    diffusers warns on every ``.to(dtype=...)`` (even a no-op), once per component and run."""
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


class DiffusionModel:
    """A loaded text-to-image diffusion model (see :func:`diffmem.models.load_model`)."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, *, device: torch.device,
                 dtype: torch.dtype, source: str, folder: Path | None = None):
        self.device, self.dtype, self.source, self.folder = device, dtype, source, folder
        self.unet = _placed(unet, device, dtype)
        self.text_encoder = _placed(text_encoder, device, dtype)
        self.vae = _placed(vae, device, dtype) if vae is not None else None
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        self.max_tokens = int(tokenizer.model_max_length)
        positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
        if positions is not None and self.max_tokens > int(positions):  # checked at load, before any file is written
            log.warning("the tokenizer's model_max_length %d exceeds the text encoder's max_position_embeddings %d; "
                        "prompts are padded and truncated to %d tokens", self.max_tokens, positions, positions)
            self.max_tokens = int(positions)
        self._empty: torch.Tensor | None = None
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------- shapes and provenance
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def fingerprint(self) -> str:
        """sha256 over the folder's configs and weights (large files: size plus head and tail)."""
        if self._fingerprint is None:
            if self.folder is not None:
                from diffmem.models.sources import folder_fingerprint

                self._fingerprint = folder_fingerprint(self.folder)
            else:
                h = hashlib.sha256()
                for module in (self.unet, self.text_encoder):
                    for name, tensor in module.state_dict().items():
                        h.update(name.encode())
                        h.update(tensor.detach().float().cpu().numpy().tobytes())
                self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Provenance of this model for results files."""
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "prediction_type": self.prediction_type,
            "latent_shape": list(self.latent_shape),
            "scheduler": self.scheduler_config.get("_class_name", "unknown"),
            "max_tokens": self.max_tokens,
        }

    def for_prompt(self, prompt: str) -> DiffusionModel:
        """The model to use when working on ``prompt``'s embedding rather than its text (an embedding attack
        optimising that prompt): the model itself, unless a mitigation acts per prompt (NeMo blocks each
        prompt's own neurons). ``prompt_specific`` says whether the answer can differ between prompts."""
        return self

    prompt_specific = False

    # ---------------------------------------------------------------- text
    @staticmethod
    def _check_prompts(prompts: Sequence[str]) -> None:
        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise PromptError("empty prompt list: expected at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise PromptError(f"prompt #{i} is {type(p).__name__}, expected str")

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt before truncation (start and end tokens included)."""
        self._check_prompts(prompts)
        # verbose=False: transformers would warn once that a sequence exceeds the model's length; we report it
        return [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, padding=False,
                                                   verbose=False).input_ids]

    def tokenize(self, prompts: Sequence[str], warn_truncation: bool = True) -> torch.Tensor:
        """Token ids padded to the tokenizer's length; over-long prompts are truncated, with one warning per
        prompt unless ``warn_truncation`` is False (the scan counts them once in provenance instead)."""
        self._check_prompts(prompts)
        if warn_truncation:
            for i, n in enumerate(self.token_counts(prompts)):
                if n > self.max_tokens:
                    log.warning("prompt #%d (%r...) has %d tokens; truncated to the tokenizer's %d",
                                i, prompts[i][:40], n, self.max_tokens)
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], batch_size: int = 256, warn_truncation: bool = True
                       ) -> torch.Tensor:
        """Text-encoder hidden states ``(N, L, D)`` as the UNet's cross-attention reads them."""
        ids = self.tokenize(prompts, warn_truncation)
        out = [self.text_encoder(ids[i : i + batch_size].to(self.device))[0] for i in range(0, len(ids), batch_size)]
        return torch.cat(out).to(self.dtype)

    def empty_embedding(self) -> torch.Tensor:
        """The unconditional branch's embedding (the empty prompt), ``(1, L, D)``, cached."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    # ---------------------------------------------------------------- noise prediction
    def to_epsilon(self, output: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Convert a UNet output in the model's parameterisation to epsilon (Salimans & Ho 2022 for v)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alphas_cumprod.to(self.device)[timesteps.long()].to(output.dtype).view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * output + (1 - a).sqrt() * latents
        return (latents - a.sqrt() * output) / (1 - a).sqrt()

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor | int, embeddings: torch.Tensor,
                      scheduler=None) -> torch.Tensor:
        """epsilon(x_t, t, c) for a batch; ``embeddings`` broadcast over the batch if it has one row."""
        n = len(latents)
        t = torch.as_tensor(timesteps, device=self.device)
        t = t.expand(n) if t.ndim == 0 else t
        if len(embeddings) == 1 and n > 1:
            embeddings = embeddings.expand(n, -1, -1)
        x = scheduler.scale_model_input(latents, t[0]) if scheduler is not None else latents
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype)).sample
        return self.to_epsilon(out, latents, t)

    def guided_pair(self, latents: torch.Tensor, timesteps: torch.Tensor | int, cond: torch.Tensor,
                    scheduler=None, uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_uncond, eps_cond) for the same latents, both branches in one batched UNet call.

        ``uncond``: the unconditional branch's embeddings, one row per latent (diffusers'
        ``negative_prompt_embeds``); default the empty prompt's for every row."""
        n = len(latents)
        uncond = self.empty_embedding() if uncond is None else uncond
        uncond = uncond.expand(n, -1, -1) if len(uncond) == 1 else uncond
        cond = cond.expand(n, -1, -1) if len(cond) == 1 else cond
        t = torch.as_tensor(timesteps, device=self.device)
        t2 = t.expand(2 * n) if t.ndim == 0 else torch.cat([t, t])
        eps = self.predict_noise(torch.cat([latents, latents]), t2, torch.cat([uncond, cond]), scheduler)
        return eps[:n], eps[n:]

    # ---------------------------------------------------------------- sampling
    def make_sampler(self, num_inference_steps: int = 50) -> DDIMScheduler:
        """A DDIM sampler on the model's training schedule, fed epsilon (outputs are converted first)."""
        sampler = DDIMScheduler.from_config(self.scheduler_config, prediction_type="epsilon")
        sampler.set_timesteps(num_inference_steps, device=self.device)
        return sampler

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed, drawn on CPU so that a seed gives the same noise on every device."""
        noise = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1] (identity for pixel-space models)."""
        if self.vae is None:
            images = latents
        else:
            images = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to scaled latents (the VAE posterior mean)."""
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x.float()
        return self.vae.encode(x).latent_dist.mean.float() * self.scaling_factor

    def denoise(self, embeddings: torch.Tensor, latents: torch.Tensor, sampler, guidance_scale: float = 7.5,
                max_steps: int | None = None, uncond: torch.Tensor | None = None) -> Iterator[GuidedStep]:
        """Run CFG + DDIM from ``latents``, yielding every step's predictions (the one sampling loop);
        ``uncond`` as in :meth:`guided_pair`."""
        x = latents
        for i, t in enumerate(sampler.timesteps):
            if max_steps is not None and i >= max_steps:
                return
            if guidance_scale == 1.0:
                eps_u = eps_c = self.predict_noise(x, t, embeddings, sampler)
            else:
                eps_u, eps_c = self.guided_pair(x, t, embeddings, sampler, uncond)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            out = sampler.step(eps.float(), t, x)
            x_next = out.prev_sample
            yield GuidedStep(index=i, timestep=int(t), latents=x, eps_uncond=eps_u, eps_cond=eps_c, next_latents=x_next,
                             x0=out.pred_original_sample)
            x = x_next

    @torch.no_grad()
    def early_estimate(self, embeddings: torch.Tensor, seeds: Sequence[int], *, num_inference_steps: int = 10,
                       stop_after: int = 4, guidance_scale: float = 7.5, batch_size: int = 64) -> torch.Tensor:
        """Decoded clean-image estimate x0_hat after the first ``stop_after`` of ``num_inference_steps`` CFG DDIM
        steps, one per (embedding, seed): a memorized image is already visible there at a fraction of the cost."""
        if not 1 <= stop_after <= num_inference_steps:
            raise ValueError(f"stop_after must be in [1, num_inference_steps={num_inference_steps}], got {stop_after}")
        if len(seeds) != len(embeddings):
            raise ValueError(f"got {len(embeddings)} embeddings but {len(seeds)} seeds; expected one seed each")
        images = []
        for start in range(0, len(embeddings), batch_size):
            sampler = self.make_sampler(num_inference_steps)
            x = self.initial_latents(seeds[start : start + batch_size]) * sampler.init_noise_sigma
            for step in self.denoise(embeddings[start : start + batch_size], x, sampler, guidance_scale,
                                     max_steps=stop_after):
                x0 = step.x0
            images.append(self.decode(check_finite(x0, f"clean-latent estimate of model {self.source}")).cpu())
        return torch.cat(images)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None, *,
               embeddings: torch.Tensor | None = None, num_inference_steps: int = 50,
               guidance_scale: float = 7.5, batch_size: int = 64, progress: bool = False,
               uncond_embeddings: torch.Tensor | None = None) -> SampleOutput:
        """Generate one image per (prompt, seed) pair with CFG and DDIM (eta 0); ``uncond_embeddings`` (one
        row per generation, default the empty prompt's) feed the unconditional branch."""
        if embeddings is None:
            if prompts is None:
                raise ValueError("sample() needs prompts or embeddings")
            embeddings = self.encode_prompts(prompts)
        n = len(embeddings)
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"got {n} prompts but {len(seeds)} seeds; expected one seed per prompt")
        images, finals = [], []
        chunks = range(0, n, batch_size)
        for start in tqdm(chunks, desc="sampling", disable=not progress, dynamic_ncols=True):
            emb = embeddings[start : start + batch_size]
            unc = None if uncond_embeddings is None else uncond_embeddings[start : start + batch_size]
            sampler = self.make_sampler(num_inference_steps)
            x = self.initial_latents(seeds[start : start + batch_size]) * sampler.init_noise_sigma
            for step in self.denoise(emb, x, sampler, guidance_scale, uncond=unc):
                x = step.next_latents
            check_finite(x, f"latents sampled from model {self.source}")
            finals.append(x.cpu())
            images.append(self.decode(x).cpu())
        return SampleOutput(images=torch.cat(images), latents=torch.cat(finals))
