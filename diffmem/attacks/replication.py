"""Replication: ``k`` generations per prompt, each matched against the training set.

The raw material of verdicts (:mod:`diffmem.eval.verdicts`): per generation its best-match similarity over
the whole training index (``gen_similarity``) and the matched item (``gen_item``), and, where the prompt's
own training item is known, its similarity to that item's images (``gen_own_similarity``: verbatim copies of
the prompt's own image, apart from template matches to another caption's image). The own images always take
part in the best match, so a shortlist (SSIM's pixel-L2 candidates) cannot miss the caption's own image.
The per-prompt ``score`` is
the best similarity; ``flagged`` uses the matcher's default threshold only as a quick look: a verdict needs
the null of never-trained prompts (``diffmem extract --null-prompts``).

Seeds are per prompt (``seed``, the prompt text and the generation number hashed), so a prompt's
generations do not depend on which other prompts share its batch and prompts do not share initial noise.
The sampler matches the zoo labeller's: DDIM, 25 steps, CFG 7.5 (Carlini et al. 2023 sample with the
model's default pipeline; Webster 2023 likewise).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.attacks.base import ATTACKS, Attack, AttackContext


def prompt_seeds(prompt: str, seed: int, k: int) -> list[int]:
    """``k`` generation seeds of one prompt, from the run's seed and the prompt's text."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    base = int.from_bytes(digest[:4], "little") & 0x3FFFFFFF
    return [base + j for j in range(k)]


def own_similarity(images: torch.Tensor, own_items: list[int | None], k: int, ctx: AttackContext) -> np.ndarray:
    """``(prompts, k)`` best similarity of each generation to its prompt's own training images (NaN: unknown)."""
    out = np.full((len(own_items), k), np.nan)
    index = ctx.index
    if index is None:
        return out
    queries = index.matcher.resize(images)
    for i, own in enumerate(own_items):
        if own is None:
            continue
        imgs = np.nonzero(index.item_of_image == own)[0]
        if len(imgs) == 0:
            continue
        block = queries[i * k:(i + 1) * k]
        train = index.matcher.train[torch.as_tensor(imgs)]
        sims = index.matcher.pairwise(block.repeat_interleave(len(imgs), 0), train.repeat(k, 1, 1, 1))
        out[i] = sims.view(k, len(imgs)).amax(1).numpy()
    return out


@ATTACKS.register("replication")
@dataclass
class Replication(Attack):
    """``generations`` samples per prompt, every one matched: per-generation similarities for verdicts."""

    name = "replication"
    generations: int = 16
    steps: int = 25
    guidance_scale: float = 7.5

    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        if ctx.index is None:
            raise ValueError("the replication attack needs a training index to match against")
        k = self.generations
        seeds = [s for p in prompts for s in prompt_seeds(p, ctx.seed, k)]
        images = model.sample([p for p in prompts for _ in range(k)], seeds, num_inference_steps=self.steps,
                              guidance_scale=self.guidance_scale).images
        images = (images * 255).round() / 255  # judged as the 8-bit image a user would save
        match = ctx.index.matcher.match(images)
        sim = match.similarity.view(len(prompts), k).numpy().astype(np.float64)
        items = ctx.index.item_of_image[match.index.numpy()].reshape(len(prompts), k)
        own_items = ctx.own_items or [None] * len(prompts)
        own = own_similarity(images, own_items, k, ctx)
        # the caption's own images are always in the shortlist: a copy of them is never missed by the search
        closer = np.nan_to_num(own, nan=-np.inf) > sim
        sim = np.where(closer, own, sim)
        items = np.where(closer, np.array([-1 if o is None else o for o in own_items])[:, None], items)
        return {"score": sim.max(1), "flagged": (sim > ctx.index.threshold).any(1),
                "gen_similarity": sim.round(6).tolist(), "gen_item": items.tolist(),
                "gen_own_similarity": own.round(6).tolist()}

    def unet_calls_per_prompt(self) -> float:
        return float(2 * self.steps * self.generations)
