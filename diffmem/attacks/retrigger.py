"""Embedding re-trigger (DoRI, "Finding Dori: Memorization in Text-to-Image Diffusion Models Is Not
Local", 2025): search a text embedding that makes the model replicate a training image again.

Starting from the prompt's own embedding e_0, minimise the ordinary denoising loss on the target
image's latent z_0 with noise and timestep resampled every step:

    min_e  E_{t, eps} || eps_theta( sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t, e ) - eps ||^2
    s.t.   || e - e_0 ||_F <= max_relative_norm * || e_0 ||_F      (optional projection)

(Adam, lr 0.1, ``batch`` noise samples per prompt, ``steps`` steps; all prompts optimised together.)
Then sample from the found embedding and match the images against the training set. This is the
adaptive attack every mitigation must survive: a fix that only hides the memory (pruning, prompt
tweaks) is undone by a small move in embedding space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffmem.attacks.base import ATTACKS, Attack, AttackContext
from diffmem.errors import DiffmemError
from diffmem.eval.similarity import resize_images


def optimise_embeddings(model, e0: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, batch: int,
                        max_relative_norm: float | None, seed: int) -> torch.Tensor:
    """The DoRI inner search for a batch of prompts; ``targets`` are scaled latents ``(B, C, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    e = e0.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=lr)
    alphas = model.alphas_cumprod.float()
    n_train = len(alphas)
    b = len(e0)
    for _ in range(steps):
        t = torch.randint(0, n_train, (b * batch,), generator=g)
        noise = torch.randn((b * batch, *targets.shape[1:]), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        z0 = targets.repeat_interleave(batch, 0)
        zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).to(model.device)
        pred = model.predict_noise(zt, t.to(model.device), e.repeat_interleave(batch, 0))
        loss = (pred.float() - noise.to(model.device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if max_relative_norm is not None:
            with torch.no_grad():
                delta = e - e0
                limit = max_relative_norm * e0.flatten(1).norm(dim=1)
                scale = (limit / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                e.copy_(e0 + delta * scale.view(-1, 1, 1))
    return e.detach()


@ATTACKS.register("retrigger", "dori")
@dataclass
class EmbeddingRetrigger(Attack):
    """Optimise the prompt embedding towards the target training image, then generate and match."""

    name = "retrigger"
    needs_white_box = True
    steps: int = 50
    lr: float = 0.1
    batch: int = 8
    max_relative_norm: float | None = 1.0
    generations: int = 4
    sample_steps: int = 25
    guidance_scale: float = 7.5

    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        if ctx.index is None:
            raise DiffmemError("the retrigger attack needs a training index (--train-index) to pick target images")
        own = ctx.own_items or [None] * len(prompts)
        first_image = {}
        for img, item in enumerate(ctx.index.item_of_image.tolist()):
            first_image.setdefault(item, img)
        targets_idx = []
        with torch.no_grad():
            probe = model.sample(prompts, [ctx.seed] * len(prompts), num_inference_steps=self.sample_steps,
                                 guidance_scale=self.guidance_scale).images
            nearest = ctx.index.matcher.match(probe).index.tolist()
        for i, item in enumerate(own):  # the prompt's own training image, else the nearest one
            targets_idx.append(first_image.get(item, nearest[i]) if item is not None else nearest[i])
        target_images = ctx.index.images[targets_idx]
        if target_images.shape[-2:] != probe.shape[-2:]:  # the index may be stored at another size
            target_images = resize_images(target_images, tuple(probe.shape[-2:]))
        targets = model.encode_images(target_images).cpu()
        e0 = model.encode_prompts(prompts)
        with torch.enable_grad():
            e = optimise_embeddings(model, e0, targets, self.steps, self.lr, self.batch, self.max_relative_norm,
                                    ctx.seed)
        k = self.generations
        images = model.sample(embeddings=e.repeat_interleave(k, 0), seeds=[ctx.seed + j for _ in prompts
                                                                           for j in range(k)],
                              num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale).images
        out = self.match_images(images, k, ctx)
        rate = np.asarray(out["replication_rate"])
        out |= {"score": rate, "flagged": (rate > 0).tolist(),
                "embedding_shift": ((e - e0).flatten(1).norm(dim=1) / e0.flatten(1).norm(dim=1)).tolist()}
        return out

    def unet_calls_per_prompt(self) -> float:
        return float(self.steps * self.batch + 2 * self.sample_steps * (self.generations + 1))
