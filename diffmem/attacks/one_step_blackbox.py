"""One-step black-box attack (Webster 2023): edge consistency across seeds after one step.

Generate ``seeds`` images with a single sampling step (only images are needed, so it works through
any generation API). For each image the Sobel gradient magnitude, summed over channels, marks edge
pixels (> ``edge_threshold``; the paper: 1.5 at 256 px); pixels that are edges in more than half the
seeds are *consistent edges*; score = their fraction of the image. A memorized prompt produces the
same edges whatever the seed; an ordinary prompt's one-step images are blurry and their edges vary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffmem.attacks.base import ATTACKS, Attack, AttackContext
from diffmem.eval.similarity import resize_images

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude per pixel, summed over channels: ``(N, C, H, W)`` -> ``(N, H, W)``."""
    n, c, h, w = images.shape
    x = F.pad(images.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(x, SOBEL_X[None, None])
    gy = F.conv2d(x, SOBEL_X.T[None, None])
    return (gx.pow(2) + gy.pow(2)).sqrt().view(n, c, h, w).sum(1)


@ATTACKS.register("one-step-blackbox", "webster-blackbox")
@dataclass
class OneStepBlackBox(Attack):
    """Fraction of pixels that are Sobel edges in more than half of ``seeds`` one-step generations."""

    name = "one-step-blackbox"
    seeds: int = 4
    edge_threshold: float = 1.5
    image_size: int | None = None  # resize before Sobel (the paper: 256); None keeps the model's size
    guidance_scale: float = 7.5
    threshold: float | None = None

    @torch.no_grad()
    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        k = self.seeds
        images = model.sample([p for p in prompts for _ in range(k)], [ctx.seed + j for _ in prompts for j in range(k)],
                              num_inference_steps=1, guidance_scale=self.guidance_scale).images
        if self.image_size is not None:
            images = resize_images(images, self.image_size)
        edges = (sobel_magnitude(images) > self.edge_threshold).float()
        edges = edges.view(len(prompts), k, *edges.shape[1:])
        consistent = edges.sum(1) > k / 2
        score = consistent.flatten(1).float().mean(1).double().numpy()
        flagged = [bool(s > self.threshold) if self.threshold is not None else False for s in score]
        return {"score": score, "flagged": flagged}

    def unet_calls_per_prompt(self) -> float:
        return float(2 * self.seeds)
