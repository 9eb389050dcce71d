"""Generate-and-filter (Carlini et al., "Extracting Training Data from Diffusion Models", 2023).

Generate ``n`` images per prompt; join two generations when their tiled L2 distance is below
``delta``: cut both images into ``tiles x tiles`` tiles, take the L2 distance of each tile pair
divided by sqrt(tile size), and keep the largest (a pair is near-identical only if *every* tile
is). A prompt is flagged when a clique of at least ``min_clique`` generations forms (the paper: 500
generations, cliques of 10). Score = size of the largest clique / n. The clique's generations are then
matched against the training set.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from diffmem.attacks.base import ATTACKS, Attack, AttackContext


def tiled_l2(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """Pairwise tiled L2 distance ``(n, n)`` of images ``(n, C, H, W)`` in [0, 1]."""
    n, c, h, w = images.shape
    th, tw = h // tiles, w // tiles
    x = images[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, tiles * tiles, -1)
    d = torch.cdist(x.transpose(0, 1), x.transpose(0, 1))  # (tiles^2, n, n)
    return (d / (x.shape[-1] ** 0.5)).amax(0)


def largest_clique(adjacency: np.ndarray) -> list[int]:
    graph = nx.from_numpy_array(adjacency.astype(int))
    graph.remove_edges_from(nx.selfloop_edges(graph))
    return max(nx.find_cliques(graph), key=len)


@ATTACKS.register("generate-filter", "carlini")
@dataclass
class GenerateAndFilter(Attack):
    """n generations per prompt, tiled-L2 graph, flag cliques of >= min_clique."""

    name = "generate-filter"
    generations: int = 16
    min_clique: int = 5
    delta: float = 0.1
    tiles: int = 4
    steps: int = 25
    guidance_scale: float = 7.5

    def run(self, model, prompts: list[str], ctx: AttackContext) -> dict:
        n = self.generations
        seeds = [ctx.seed + j for _ in prompts for j in range(n)]
        images = model.sample([p for p in prompts for _ in range(n)], seeds, num_inference_steps=self.steps,
                              guidance_scale=self.guidance_scale).images
        sizes, members = [], torch.zeros(len(images), dtype=torch.bool)
        for i in range(len(prompts)):
            block = images[i * n : (i + 1) * n]
            clique = largest_clique((tiled_l2(block, self.tiles) < self.delta).numpy())
            sizes.append(len(clique))
            if len(clique) >= self.min_clique:
                members[[i * n + j for j in clique]] = True
        out = {"score": np.asarray(sizes, dtype=np.float64) / n, "flagged": [s >= self.min_clique for s in sizes]}
        if ctx.index is not None:
            out |= self.match_images(images, n, ctx, use=members)
        return out

    def unet_calls_per_prompt(self) -> float:
        return float(2 * self.steps * self.generations)
