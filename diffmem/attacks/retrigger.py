"""Embedding re-trigger attacks: search a text embedding that makes the model replicate a training image
again (the adaptive attack every mitigation must survive: a fix that only hides the memory, such as pruning
or a prompt tweak, is undone by a move in embedding space).

Both attacks here minimise the ordinary denoising loss on the target image's latent z_0, with noise and
timestep resampled every step (Kowalczuk et al., "Finding Dori", arXiv 2507.16880):

    min_e  E_{t, eps} || eps_theta( sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t, e ) - eps ||^2
    s.t.   || e - e_0 ||_F <= max_relative_norm * || e_0 ||_F      (optional projection)

with Adam, ``batch`` noise samples per prompt per step, all prompts optimised together; then sample from
each found embedding and match the images against the training set.

- ``dori`` (:mod:`diffmem.attacks.dori`): the paper's settings, the bench's default re-trigger;
- ``retrigger`` (alias ``retrigger-tuned``): the weaker setting diffmem's bench used before (Adam lr
  0.01, 30 steps, relative norm bound 0.3, one start from the prompt), kept as a second row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from diffmem.attacks.base import ATTACKS, Attack, AttackContext
from diffmem.errors import DiffmemError
from diffmem.eval.similarity import resize_images


def optimise_embeddings(model, e0: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, batch: int,
                        max_relative_norm: float | None, seed: int, init: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """The inner search for a batch of prompts; ``targets`` are scaled latents ``(B, C, h, w)``. It starts
    from ``init`` (default ``e0``); the optional bound is measured from ``e0``."""
    g = torch.Generator().manual_seed(seed)
    e = (e0 if init is None else init).detach().clone().float().requires_grad_(True)
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


def start_embeddings(e0: torch.Tensor, start: int, noise: float, seed: int) -> torch.Tensor:
    """Start ``start`` of the search: the prompt's own embedding for start 0; for later starts, the prompt's
    embedding plus Gaussian noise of ``noise`` times its element standard deviation (seeded per start)."""
    if start == 0:
        return e0
    g = torch.Generator().manual_seed(seed * 7919 + start)
    scale = e0.float().flatten(1).std(dim=1).view(-1, 1, 1)
    return e0 + (noise * scale * torch.randn(e0.shape, generator=g)).to(e0)


def target_latents(model, prompts: list[str], ctx: AttackContext, sample_steps: int, guidance_scale: float
                   ) -> torch.Tensor:
    """Each prompt's target as scaled latents: its own training image when known, else the training image
    nearest to one generation of the prompt."""
    if ctx.index is None:
        raise DiffmemError("a re-trigger attack needs a training index (--train-index) to pick target images")
    own = ctx.own_items or [None] * len(prompts)
    first_image: dict[int, int] = {}
    for img, item in enumerate(ctx.index.item_of_image.tolist()):
        first_image.setdefault(item, img)
    with torch.no_grad():
        probe = model.sample(prompts, [ctx.seed] * len(prompts), num_inference_steps=sample_steps,
                             guidance_scale=guidance_scale).images
        nearest = ctx.index.matcher.match(probe).index.tolist()
    chosen = [first_image.get(item, nearest[i]) if item is not None else nearest[i] for i, item in enumerate(own)]
    images = ctx.index.images[chosen]
    if images.shape[-2:] != probe.shape[-2:]:  # the index may be stored at another size
        images = resize_images(images, tuple(probe.shape[-2:]))
    return model.encode_images(images).cpu()


@ATTACKS.register("retrigger", "retrigger-tuned")
@dataclass
class EmbeddingRetrigger(Attack):
    """Optimise the prompt embedding towards the target training image from ``starts`` starting points, then
    generate from each found embedding and match; a prompt's replication rate is its best start's."""

    name = "retrigger"
    needs_white_box = True
    steps: int = 30
    lr: float = 0.01
    batch: int = 8
    max_relative_norm: float | None = 0.3
    starts: int = 1
    start_noise: float = 0.1
    generations: int = 4
    sample_steps: int = 25
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        if self.starts < 1 or self.steps < 0 or self.batch < 1 or self.generations < 1:
            raise DiffmemError(f"{self.name}: starts, batch and generations must be >= 1 and steps >= 0")

    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        if model.prompt_specific and len(prompts) > 1:  # a per-prompt mitigation: attack each prompt on its own
            return self.run_each(model, prompts, ctx)
        targets = target_latents(model, prompts, ctx, self.sample_steps, self.guidance_scale)
        e0 = model.encode_prompts(prompts)
        k = self.generations
        seeds = [ctx.seed + j for _ in prompts for j in range(k)]
        rates, shifts, per_start = [], [], []
        best: dict[str, list] | None = None
        for s in range(self.starts):
            with torch.enable_grad():
                e = optimise_embeddings(model, e0, targets, self.steps, self.lr, self.batch, self.max_relative_norm,
                                        ctx.seed + s, init=start_embeddings(e0, s, self.start_noise, ctx.seed))
            images = model.sample(embeddings=e.repeat_interleave(k, 0), seeds=seeds,
                                  num_inference_steps=self.sample_steps, guidance_scale=self.guidance_scale).images
            out = self.match_images(images, k, ctx)
            rate = np.asarray(out["replication_rate"])
            shift = ((e - e0).flatten(1).norm(dim=1) / e0.flatten(1).norm(dim=1)).cpu().numpy()
            if best is None:
                best = out
            else:  # keep, per prompt, the start that replicates most (ties: the earlier start)
                better = rate > np.asarray(rates).max(0)
                for key, values in out.items():
                    best[key] = [v if b else old for v, old, b in zip(values, best[key], better)]
            rates.append(rate)
            shifts.append(shift)
            per_start.append(rate.tolist())
        rates_a, shifts_a = np.asarray(rates), np.asarray(shifts)
        chosen = rates_a.argmax(0)
        best_rate = rates_a.max(0)
        assert best is not None
        best |= {"replication_rate": best_rate.tolist(), "score": best_rate, "flagged": (best_rate > 0).tolist(),
                 "embedding_shift": shifts_a[chosen, np.arange(len(prompts))].tolist(),
                 "replication_rate_per_start": np.asarray(per_start).T.tolist()}
        return best

    def run_each(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        """:meth:`run` on each prompt alone, against ``model.for_prompt(prompt)`` (the mitigation as it acts on
        that prompt: NeMo with that prompt's neurons blocked), the outputs concatenated in prompt order."""
        outs = [self.run(model.for_prompt(p), [p], replace(ctx, own_items=list(ctx.own_items[i:i + 1])))
                for i, p in enumerate(prompts)]
        return {k: np.concatenate([o[k] for o in outs]) if isinstance(outs[0][k], np.ndarray)
                else [v for o in outs for v in o[k]] for k in outs[0]}

    def unet_calls_per_prompt(self) -> float:
        return float(self.starts * (self.steps * self.batch + 2 * self.sample_steps * self.generations)
                     + 2 * self.sample_steps)
