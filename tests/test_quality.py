"""Quality metrics (diffmem.eval.quality) on hand-made tensors, against the formulas computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from diffmem.eval.quality import diversity, fid
from diffmem.eval.similarity import pairwise_ssim, ssim_pairs


class ChannelMeans(nn.Module):
    """A 3-d feature extractor: each image's per-channel mean (stands in for Inception / the zoo's reader)."""

    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3)).double()


def _images(means: np.ndarray, size: int = 4) -> torch.Tensor:
    """Flat images whose per-channel means are ``means`` ``(N, 3)``."""
    return torch.tensor(means, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).contiguous()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), covariances with n - 1 (Heusel et al. 2017)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_fid_with_a_custom_feature_matches_the_frechet_formula():
    rng = np.random.default_rng(0)
    real = rng.uniform(0.2, 0.6, size=(40, 3))
    fake = rng.uniform(0.3, 0.9, size=(30, 3)) * np.array([1.0, 0.5, 0.8])
    got = fid(_images(real), _images(fake), ChannelMeans(), batch_size=16)
    features = [ChannelMeans()(_images(x)).numpy() for x in (real, fake)]  # float32 images, as fid sees them
    assert got == pytest.approx(_frechet(*features), rel=1e-4)
    assert got > 0.05  # the sets differ
    assert fid(_images(real), _images(real), ChannelMeans()) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_a_mean_shift_by_its_square():
    rng = np.random.default_rng(1)
    real = rng.uniform(0.2, 0.6, size=(50, 3))
    shift = np.array([0.1, 0.0, 0.0])
    # same covariance, means 0.1 apart in one feature: FID = 0.1^2 (the trace term vanishes)
    assert fid(_images(real), _images(real + shift), ChannelMeans()) == pytest.approx(0.01, rel=1e-3, abs=1e-6)


def test_diversity_is_the_mean_pairwise_one_minus_ssim_within_each_prompt():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.rand(3, 3, 16, 16, generator=g)
    # prompt 1: two identical generations (diversity 0); prompt 2: a and b
    images = torch.stack([a, a, a, b])
    expected = (0.0 + (1 - float(ssim_pairs(a[None], b[None])[0]))) / 2
    assert diversity(images, per_prompt=2) == pytest.approx(expected, rel=1e-5)
    # three per prompt: the three pairs (a, b), (a, c), (b, c)
    pairs = ssim_pairs(torch.stack([a, a, b]), torch.stack([b, c, c]))
    assert diversity(torch.stack([a, b, c]), per_prompt=3) == pytest.approx(float((1 - pairs).mean()), rel=1e-5)
    assert diversity(torch.stack([a, b, c]), per_prompt=3) > 0.5  # random images share little structure
    with pytest.raises(ValueError, match="at least 2"):
        diversity(images, per_prompt=1)


def test_pairwise_ssim_by_index_groups_and_by_blocks_agree_with_the_pairs():
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.rand(3, 3, 16, 16, generator=g)
    images = torch.stack([a, b, c, a])
    ab, ac, bc = (float(s) for s in ssim_pairs(torch.stack([a, a, b]), torch.stack([b, c, c])))
    # groups of unequal size, overlapping: {a, b, c} and {a (index 3), a (index 0)}
    per_group = pairwise_ssim(images, [[0, 1, 2], [3, 0]])
    assert per_group.dtype == np.float64
    assert per_group == pytest.approx([(ab + ac + bc) / 3, 1.0], rel=1e-6)
    assert pairwise_ssim(images, 2) == pytest.approx([ab, ac], rel=1e-6)  # blocks (a, b) and (c, a)
    with pytest.raises(ValueError, match=">= 2 images per group"):
        pairwise_ssim(images, [[0]])
