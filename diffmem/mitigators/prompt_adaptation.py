"""Prompt-embedding adaptation (Wen et al., "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024; code: YuxinWenRick/diffusion_memorization), as its authors run it.

Before sampling, optimise a copy of each prompt's conditional text embedding e so that the first-step
guidance magnitude over the prompt's generations

    L(e) = || [eps(x_T^j, e) - eps(x_T^j, "")]_{j=1..G} ||_2        (one norm over all G generations)

falls to ``target`` or below, then sample normally with the adapted embedding. As in the reference
(``local_sd_pipeline.py``, ``aug_prompt``):

- the loss is ``torch.norm(noise_pred_text, p=2)`` over the G generations' guidance together (L615-619),
  taken at the first sampling step (``target_steps=[0]``, ``inference_mem.py`` L257);
- the optimiser is ``torch.optim.AdamW([embeds], lr=lr)`` (L563: torch's default weight decay 0.01
  applies to the whole embedding), lr 0.05 and at most 10 iterations (``inference_mem.py`` L258-259);
- the start-of-text token gets no gradient (L649-651; AdamW's decoupled decay still shrinks it, as there);
- the loss is checked *before* each update and the loop stops once ``loss <= target`` (L640-644): an
  adapted embedding is the one whose loss was measured at or below target. Prompts are optimised one at
  a time there; diffmem batches them, so a prompt that reached target is frozen (its row restored after
  every later update: neither Adam's momentum nor the decay move it) and a prompt adapted in a batch
  equals the prompt adapted alone;
- the generations' own initial latents are the ones optimised against (the same seed is set before
  ``aug_prompt`` and before sampling, ``inference_mem.py`` L92 and L106): ``model.sample(prompts, seeds)``
  adapts each prompt on the latents of its own seeds. Outside sampling (``encode_prompts``: detectors,
  attacks) the latents of ``draws`` fixed seeds stand in.

``target``: the reference's 3 was set for SD1.4 at 4 generations; ``fit`` sets it from ordinary prompts
(their ``target_quantile`` of L over ``draws`` generations) when not given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffmem.mitigators.base import MITIGATORS, InferenceMitigator, PatchedModel, check_prompt_lists
from diffmem.models.model import DiffusionModel, SampleOutput

WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which local_sd_pipeline.py L563 leaves in place


def adaptation_loss(model: DiffusionModel, emb: torch.Tensor, latents: torch.Tensor, t: int,
                    eps_u: torch.Tensor) -> torch.Tensor:
    """L(e) per prompt, differentiable in ``emb``: ``(B,)``. ``latents`` and ``eps_u`` are ``(D, C, h, w)``
    (shared by all prompts) or ``(B, D, C, h, w)`` (each prompt its own generations)."""
    b = len(emb)
    if latents.ndim == 4:
        latents, eps_u = latents.expand(b, *latents.shape), eps_u.expand(b, *eps_u.shape)
    d = latents.shape[1]
    eps_c = model.predict_noise(latents.flatten(0, 1), t, emb.repeat_interleave(d, 0)).float()
    return (eps_c.view(b, d, -1) - eps_u.reshape(b, d, -1)).flatten(1).norm(dim=1)


def adapt_embeddings(model: DiffusionModel, emb: torch.Tensor, target: float, lr: float, max_steps: int,
                     latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted embeddings, updates taken per prompt) on ``latents`` (x_T, shapes as in :func:`adaptation_loss`)."""
    sampler = model.make_sampler(50)
    t = int(sampler.timesteps[0])
    latents = latents.to(model.device)
    with torch.no_grad():
        eps_u = model.predict_noise(latents.flatten(0, -4), t, model.empty_embedding()).float().view(latents.shape)
    e = emb.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([e], lr=lr, weight_decay=WEIGHT_DECAY)
    done = torch.zeros(len(e), dtype=torch.bool)
    steps = torch.zeros(len(e), dtype=torch.long)
    for _ in range(max_steps):
        with torch.enable_grad():
            loss = adaptation_loss(model, e, latents, t, eps_u)
        newly = (loss.detach().cpu() <= target) & ~done
        done |= newly
        if done.all():
            break
        frozen = e.detach()[done].clone()
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():  # callers (an attack's probe generations) may sample under no_grad
            loss[~done].sum().backward()  # prompts are independent: each row's gradient is its own loss's
        e.grad[:, 0] = 0  # start-of-text token frozen (local_sd_pipeline.py L649-651)
        opt.step()
        with torch.no_grad():
            e[done] = frozen  # reached target: no momentum or decay drift past it
        steps += (~done).long()
    return e.detach().to(emb.dtype), steps


@MITIGATORS.register("prompt-adaptation", "wen-adaptation")
@dataclass
class PromptAdaptation(InferenceMitigator):
    """Adapt each prompt's embedding until its first-step guidance magnitude is at or below ``target``."""

    name = "prompt-adaptation"
    target: float | None = None
    target_quantile: float = 0.9
    lr: float = 0.05  # inference_mem.py L258
    max_steps: int = 10  # inference_mem.py L259 (optim_iters)
    draws: int = 4  # inference_mem.py L242 (num_images_per_prompt): generations per prompt outside sample()
    seed: int = 0

    def fixed_latents(self, model: DiffusionModel) -> torch.Tensor:
        return model.initial_latents([self.seed + j for j in range(self.draws)])

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str]) -> None:
        if self.target is not None:
            return
        check_prompt_lists(memorized, ordinary, needs_memorized=False)
        t = int(model.make_sampler(50).timesteps[0])
        latents = self.fixed_latents(model)
        with torch.no_grad():
            eps_u = model.predict_noise(latents, t, model.empty_embedding()).float()
            losses = torch.cat([adaptation_loss(model, model.encode_prompts(ordinary[i : i + 128]), latents, t, eps_u)
                                for i in range(0, len(ordinary), 128)])
        self.target = float(np.quantile(losses.cpu().numpy(), self.target_quantile))

    def describe_fit(self) -> dict:
        return {"target": self.target}

    def adapt(self, model: DiffusionModel, emb: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            raise ValueError("prompt-adaptation needs target=... or fit() on ordinary prompts first")
        return adapt_embeddings(model, emb, self.target, self.lr, self.max_steps, latents)[0]

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        if self.target is None:
            raise ValueError("prompt-adaptation needs target=... or fit() on ordinary prompts first")
        mitigator = self

        class Adapted(PatchedModel):
            def encode_prompts(self, prompts, batch_size: int = 256, **kwargs):  # kwargs: e.g. warn_truncation
                emb = model.encode_prompts(prompts, batch_size, **kwargs)
                if list(prompts) == [""]:
                    return emb
                return mitigator.adapt(model, emb, mitigator.fixed_latents(model))

            def sample(self, prompts=None, seeds=None, *, embeddings=None, **kwargs) -> SampleOutput:
                if embeddings is None and prompts is not None:
                    prompts = list(prompts)
                    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
                    embeddings = adapt_per_generation(mitigator, model, prompts, seeds)
                return super().sample(seeds=seeds, embeddings=embeddings, **kwargs)

        return Adapted.of(model)


def adapt_per_generation(mitigator: PromptAdaptation, model: DiffusionModel, prompts: list[str],
                         seeds: list[int]) -> torch.Tensor:
    """One embedding per generation: each distinct prompt adapted on the initial latents of all its seeds
    (the reference's G generations of one prompt), prompts with equally many seeds adapted in one batch."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows_of.setdefault(p, []).append(i)
    distinct = list(rows_of)
    base = model.encode_prompts(distinct)
    out = torch.empty(len(prompts), *base.shape[1:], dtype=base.dtype, device=base.device)
    by_count: dict[int, list[int]] = {}  # generations per prompt -> indices into ``distinct``
    for j, p in enumerate(distinct):
        by_count.setdefault(len(rows_of[p]), []).append(j)
    for group in by_count.values():
        latents = torch.stack([model.initial_latents([seeds[i] for i in rows_of[distinct[j]]]) for j in group])
        adapted = mitigator.adapt(model, base[group], latents)
        for row, j in zip(adapted, group):
            out[rows_of[distinct[j]]] = row
    return out
