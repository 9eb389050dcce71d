"""Image similarity and nearest-neighbour search shared by labelling, attacks and matchers.

SSIM follows Wang et al. (2004) through torchmetrics with fixed parameters: Gaussian window 7x7,
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, mean over pixels and channels. The 7x7 window (instead
of the usual 11x11) suits 32x32 images; it is recorded in every labels file.

:func:`resize_images` is the one resize path for everything compared here: training images read from a
folder and generations are brought to the index's size by the same function, so an exact copy of a
training image scores SSIM 1 (two resamplers, e.g. PIL bicubic for the index and torch bilinear for the
generations, gave a copy 0.986 at 64 px).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SSIM_PARAMS = {"gaussian_kernel": True, "kernel_size": 7, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0}


def resize_images(images: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``(N, C, H, W)`` images resized to ``size`` (an int: square) by ``mode`` interpolation with antialiasing
    (area-weighted when shrinking), float32, clamped to [0, 1]; returned unchanged (as float32) at that size.
    ``mode`` is ``bilinear`` everywhere images are compared; ``bicubic`` where a model's own preprocessing
    asks for it (CLIP)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images.float()
    out = F.interpolate(images.float(), size=hw, mode=mode, antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)


def ssim_pairs(a: torch.Tensor, b: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """SSIM of ``a[i]`` with ``b[i]`` for images ``(N, C, H, W)`` in [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"ssim_pairs needs two batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    # imported here: torchmetrics pulls in ~2 s of modules that a noise-step scan never needs
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = [
        structural_similarity_index_measure(a[i : i + batch_size].float(), b[i : i + batch_size].float(),
                                            reduction="none", **SSIM_PARAMS)
        for i in range(0, len(a), batch_size)
    ]
    return torch.cat(out)


def pairwise_ssim(images: torch.Tensor, groups: int | Sequence[Sequence[int]]) -> np.ndarray:
    """Per group of images, the mean SSIM over all its pairs (float64): about 1 when a group's images are one
    picture, low when they differ. ``groups`` is ``k`` (the images are groups of ``k`` consecutive images, e.g.
    ``k`` seeds of each caption, caption after caption) or lists of indices into ``images`` (each >= 2)."""
    if isinstance(groups, int):
        k = groups
        if k < 2 or len(images) % k:
            raise ValueError(f"pairwise SSIM needs k >= 2 images per group and a multiple of k, got {len(images)}, "
                             f"k={k}")
        groups = [range(c * k, (c + 1) * k) for c in range(len(images) // k)]
    a_idx, b_idx, owner = [], [], []
    for g, members in enumerate(groups):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"pairwise SSIM needs >= 2 images per group; group {g} has {len(members)}")
        for p in range(len(members)):
            for q in range(p + 1, len(members)):
                a_idx.append(members[p])
                b_idx.append(members[q])
                owner.append(g)
    if not owner:
        return np.zeros(0)
    sims = ssim_pairs(images[a_idx], images[b_idx]).double().numpy()
    return np.bincount(owner, weights=sims) / np.bincount(owner)


def l2_nearest(queries: torch.Tensor, index: torch.Tensor, k: int = 2, chunk: int = 1024
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest index rows by pixel L2 / sqrt(dim) (Gu et al. 2025's distance), chunked matrix products."""
    q = queries.reshape(len(queries), -1).float()
    x = index.reshape(len(index), -1).float()
    x_sq = (x * x).sum(1)
    dists, ids = [], []
    for i in range(0, len(q), chunk):
        qc = q[i : i + chunk]
        d2 = (qc * qc).sum(1, keepdim=True) - 2 * qc @ x.T + x_sq[None]
        d, j = d2.clamp_min(0).topk(min(k, len(x)), dim=1, largest=False)
        dists.append((d / q.shape[1]).sqrt())
        ids.append(j)
    return torch.cat(dists), torch.cat(ids)
