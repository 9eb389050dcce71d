"""Matching generations to training images: one resize path, duplicate groups in the index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.eval.matching import duplicate_groups, make_matcher
from diffmem.eval.similarity import resize_images, ssim_pairs
from diffmem.images import load_image_folder


def _save(tmp_path, name: str, array: np.ndarray) -> None:
    Image.fromarray(array).save(tmp_path / name)


@pytest.mark.parametrize("size", [64, 32])  # nn-ratio's default index side, and extract's
def test_an_exact_copy_scores_ssim_1_at_the_index_size(tmp_path, size):
    """A training image and a generation identical to it are resized by the same function, so they match exactly
    (PIL bicubic for the folder and torch bilinear for the generation gave 0.986)."""
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                                             size=(128, 128), mode="bilinear")[0]
    copy = (smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    _save(tmp_path, "a_copy.png", copy)
    for i in range(3):
        _save(tmp_path, f"other_{i}.png", rng.integers(0, 256, (96, 80, 3), dtype=np.uint8))
    index = load_image_folder(tmp_path, size)
    assert index.shape == (4, 3, size, size)
    generation = torch.from_numpy(copy).permute(2, 0, 1)[None].float() / 255.0  # a 128 px generation
    assert torch.equal(index[0], resize_images(generation, size)[0])
    top = make_matcher("ssim").fit(index).match(generation)
    assert int(top.index[0]) == 0
    assert float(top.similarity[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(ssim_pairs(index[:1], index[1:2])[0]) < 0.5  # the others are not copies


def test_duplicate_groups_joins_exact_copies_and_near_duplicates():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")[0]
               for _ in range(3))
    near_a = (a + 0.004 * torch.randn(a.shape, generator=g)).clamp(0, 1)  # a re-encoded copy: off by ~1 level of 255
    close_b = (b + 0.03).clamp(0, 1)  # a different image, 7.6 levels brighter: SSIM 0.99 to b, yet not a copy
    images = torch.stack([a, b, a, near_a, c, b, close_b])
    assert float(ssim_pairs(b[None], close_b[None])[0]) > 0.99
    groups = duplicate_groups(images)
    assert groups.group.tolist() == [0, 1, 0, 0, 2, 1, 3]
    assert groups.representatives.tolist() == [0, 1, 4, 6]
    assert groups.summary() == {"images": 7, "groups": 4, "exact_copies": 2, "near_duplicates": 1,
                                "near_duplicate_rms": 0.01}
    exact_only = duplicate_groups(images, max_rms=0)
    assert exact_only.group.tolist() == [0, 1, 0, 2, 3, 1, 4] and exact_only.near_duplicates == 0
    matcher = make_matcher("ssim").fit(images)
    sub = matcher.subset(groups.representatives)
    assert torch.equal(sub.train, images[[0, 1, 4, 6]]) and len(matcher.train) == 7


@pytest.mark.parametrize("max_k", [64, 2])  # 2: every shortlisted image is a copy, the groups' first images decide
def test_nearest_two_groups_skips_copies_of_the_nearest_image(max_k):
    from diffmem.eval.matching import nearest_two_groups

    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")[0]
               for _ in range(3))
    images = torch.stack([a, a, b, a, c])
    matcher = make_matcher("ssim").fit(images)
    groups = duplicate_groups(images)
    assert groups.group.tolist() == [0, 0, 1, 0, 2]
    nearest, second = nearest_two_groups(matcher, groups, torch.stack([a, c]), max_k=max_k)
    expected = ssim_pairs(torch.stack([a, a]), torch.stack([b, c])).max()
    assert float(nearest[0]) == pytest.approx(1.0, abs=1e-6) and float(second[0]) == pytest.approx(float(expected))
    expected_c = ssim_pairs(c[None].expand(2, -1, -1, -1), torch.stack([a, b])).max()
    assert float(second[1]) == pytest.approx(float(expected_c))
    top = matcher.match_top(a[None], 2)  # what a plain search sees: two copies, margin 0
    assert float(top.similarity[0, 0] - top.similarity[0, 1]) == pytest.approx(0.0, abs=1e-6)
