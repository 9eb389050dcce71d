"""DeepSSIM: training mechanics, augmentation, and the detector's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.eval.deepssim import DeepSSIM, DeepSSIMConfig, agreement, augment, sample_pairs, train_deepssim
from diffmem.models import load_model
from diffmem.zoo.corpus import build_corpus, render_item


def _images(n: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    items = [it for it in build_corpus() if it.kind == "generic"][: n // 2]
    imgs = [render_item(it, c) for it in items for c in range(min(2, len(it.image_seeds)))]
    groups = np.array([it.item_id for it in items for c in range(min(2, len(it.image_seeds)))])
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255, groups


def test_embeddings_are_unit_vectors_and_resize_any_input():
    model = DeepSSIM(DeepSSIMConfig(dim=16))
    e = model.embed(torch.rand(3, 3, 64, 48))
    assert e.shape == (3, 16)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))


def test_augment_is_seeded_and_keeps_range():
    x = torch.rand(8, 3, 32, 32)
    cfg = DeepSSIMConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(0))
    b = augment(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def test_pairs_mix_identical_same_group_and_random():
    groups = np.repeat(np.arange(10), 3)
    a, b = sample_pairs(30, groups, 300, np.random.default_rng(0))
    assert (a == b).mean() > 0.2
    assert (groups[a] == groups[b]).mean() > 0.5


def test_short_training_reduces_the_regression_error():
    images, groups = _images()
    cfg = DeepSSIMConfig(steps=60, batch=32, width=8, dim=32)
    untrained = agreement(DeepSSIM(cfg), images, groups, n_pairs=200)
    trained = agreement(train_deepssim(images, cfg, groups, progress=False), images, groups, n_pairs=200)
    assert trained["mae"] < untrained["mae"]


def test_deepssim_seeds_is_mean_pairwise_cosine(tiny_sd_folder, tmp_path):
    emb_model = DeepSSIM(DeepSSIMConfig(dim=8, width=4))
    emb_model.save(tmp_path / "ds")
    model = load_model(tiny_sd_folder)
    det = make_detector("deepssim-seeds", samples=3, steps=2, embedder=str(tmp_path / "ds"))
    engine = NoiseStepEngine(model, n_draws=1, seed=4)
    prompt = model.encode_prompts(["a cat"])
    got = float(det.score_prompts(model, prompt, engine)[0])
    images = model.sample(["a cat"] * 3, seeds=[4, 5, 6], num_inference_steps=2).images
    e = DeepSSIM.load(tmp_path / "ds").embed(images)
    pairs = [float(e[i] @ e[j]) for i in range(3) for j in range(3) if i != j]
    assert got == pytest.approx(sum(pairs) / len(pairs), rel=1e-4)
    assert det.unet_calls_per_prompt(engine) == 2 * 2 * 3
