"""DeepSSIM (2025): an image embedding whose cosine similarity regresses SSIM.

A siamese encoder f maps an image to a 256-d L2-normalised vector and is trained so that
``cos(f(aug1(a)), f(aug2(b))) ~= SSIM(a, b)``: MSE between the cosine and the SSIM of the
*un-augmented* pair, with flips, small rotations and contrast changes drawn independently for each
image of a pair, so the embedding tolerates misalignment that pixel SSIM punishes. The authors use
ConvNeXt-Base features; no pretrained weights can be downloaded here, so diffmem trains a small CNN
from scratch (inputs resized to ``image_size``) with their optimiser settings (AdamW lr 1e-3, weight
decay 1e-3, gradient clip 1). Flags from the paper: > 0.85 duplicate, <= 0.6 different.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffmem.eval.similarity import resize_images, ssim_pairs

DUPLICATE, DIFFERENT = 0.85, 0.6


@dataclass(frozen=True)
class DeepSSIMConfig:
    """Embedder size and training settings (saved beside the weights)."""

    image_size: int = 32
    width: int = 32
    dim: int = 256
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-3
    max_rotation: float = 8.0
    contrast: float = 0.2
    seed: int = 0


class DeepSSIM(nn.Module):
    """Images in [0, 1] ``(N, 3, H, W)`` -> unit vectors ``(N, dim)``."""

    def __init__(self, cfg: DeepSSIMConfig = DeepSSIMConfig()):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * w * 16, cfg.dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = resize_images(images, self.cfg.image_size)
        return F.normalize(self.net(images * 2 - 1), dim=-1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> DeepSSIM:
        folder = Path(folder)
        model = cls(DeepSSIMConfig(**json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def augment(images: torch.Tensor, cfg: DeepSSIMConfig, g: torch.Generator) -> torch.Tensor:
    """Independent random flip, rotation (+-max_rotation degrees) and contrast per image."""
    n = len(images)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(cfg.max_rotation)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    factor = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * cfg.contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def sample_pairs(n_images: int, groups: np.ndarray | None, batch: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs mixing identical images, same-group images (e.g. one caption) and random images."""
    a = rng.integers(n_images, size=batch)
    b = rng.integers(n_images, size=batch)
    kind = rng.integers(3, size=batch)
    b[kind == 0] = a[kind == 0]
    if groups is not None:
        members: dict[int, np.ndarray] = {}
        for i in np.nonzero(kind == 1)[0]:
            g = int(groups[a[i]])
            if g not in members:
                members[g] = np.nonzero(groups == g)[0]
            b[i] = rng.choice(members[g])
    return a, b


def train_deepssim(images: torch.Tensor, cfg: DeepSSIMConfig = DeepSSIMConfig(), groups: np.ndarray | None = None,
                   progress: bool = True) -> DeepSSIM:
    """Train on ``images`` (N, 3, H, W) in [0, 1]; ``groups`` (e.g. caption ids) supply similar pairs."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = DeepSSIM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in tqdm(range(cfg.steps), desc="deepssim", disable=not progress, dynamic_ncols=True):
        a, b = sample_pairs(len(images), groups, cfg.batch, rng)
        xa, xb = images[a], images[b]
        target = ssim_pairs(xa, xb)
        cos = (model(augment(xa, cfg, g)) * model(augment(xb, cfg, g))).sum(-1)
        loss = F.mse_loss(cos, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@torch.no_grad()
def agreement(model: DeepSSIM, images: torch.Tensor, groups: np.ndarray | None, n_pairs: int = 2000,
              seed: int = 1) -> dict[str, float]:
    """Pearson and Spearman correlation, and MAE, of DeepSSIM cosine vs true SSIM on (held-out) pairs."""
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(seed)
    a, b = sample_pairs(len(images), groups, n_pairs, rng)
    keep = a != b  # identical pairs are trivially 1 for both
    a, b = a[keep], b[keep]
    target = ssim_pairs(images[a], images[b]).numpy()
    cos = (model.embed(images[a]) * model.embed(images[b])).sum(-1).numpy()
    return {"pairs": int(len(a)), "pearson": float(pearsonr(cos, target)[0]),
            "spearman": float(spearmanr(cos, target)[0]), "mae": float(np.abs(cos - target).mean())}


def train_and_save(images: torch.Tensor, groups: np.ndarray | None, out: str | Path,
                   cfg: DeepSSIMConfig = DeepSSIMConfig(), progress: bool = True) -> dict:
    """Hold out 10% of the images, train on the rest, save weights and held-out agreement to ``out``."""
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_held = max(2, len(images) // 10)
    held, train = order[:n_held], order[n_held:]
    model = train_deepssim(images[train], cfg, None if groups is None else groups[train], progress=progress)
    stats = {"held_out_images": int(n_held), **agreement(model, images[held], None if groups is None else groups[held])}
    model.save(out)
    (Path(out) / "agreement.json").write_text(json.dumps(stats, indent=2))
    return stats
