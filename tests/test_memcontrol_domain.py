"""MemControl on a fine-tuning set with a new domain: the quality term, the set builder, extraction and the
search's selection rule (issue 12, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.eval.finetune_domain import title_extraction, to_tensor
from diffmem.eval.quality import heldout_denoising_loss, relative_improvement
from diffmem.mitigators.memcontrol import (
    FinetuneData,
    MemControlSearch,
    finetune,
    select_trial,
    transformer_blocks,
    trial_rank,
)
from diffmem.models import load_model
from diffmem.zoo.finetune_sets import build_sd_domain_set


class _StubModel:
    """Just what heldout_denoising_loss reads: identity 'VAE', a schedule, a noise predictor."""

    def __init__(self, oracle: bool):
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
        self.device = torch.device("cpu")
        self.oracle = oracle
        self.z0: torch.Tensor | None = None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.z0 = images.float() * 2 - 1
        return self.z0

    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        return torch.zeros(len(captions), 1, 1)

    def predict_noise(self, zt: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.oracle:
            return torch.zeros_like(zt)
        # the exact noise: invert z_t = sqrt(a) z0 + sqrt(1 - a) eps (one image, so z0 broadcasts)
        a = self.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        return (zt - a.sqrt() * self.z0[:1]) / (1 - a).sqrt()


def test_heldout_loss_equals_a_hand_computation():
    images = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    steps = (10, 500)
    # a predictor of zeros scores the mean squared noise, drawn from the stated seed in (image, t) order
    zero = heldout_denoising_loss(_StubModel(oracle=False), images, ["x"], timesteps=steps, noise_seed=5)
    eps = torch.randn((1, 2, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    assert zero.shape == (1,)
    assert zero[0].item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)
    # the exact noise scores zero
    exact = heldout_denoising_loss(_StubModel(oracle=True), images, ["x"], timesteps=steps, noise_seed=5)
    assert exact[0].item() == pytest.approx(0.0, abs=1e-8)
    assert relative_improvement(0.25, 0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        heldout_denoising_loss(_StubModel(oracle=False), images, ["x", "y"])
    with pytest.raises(ValueError):
        heldout_denoising_loss(_StubModel(oracle=False), images, ["x"], timesteps=(1000,))


def test_heldout_loss_drops_after_fitting_the_images(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear")
    captions = ["a painting of a red circle", "a poster of a blue cross"] * 2
    before = heldout_denoising_loss(model, images, captions, noise_seed=1)
    assert torch.equal(before, heldout_denoising_loss(model, images, captions, noise_seed=1))  # fixed noise
    data = FinetuneData(model.encode_images(images), model.encode_prompts(captions))
    fitted, _ = finetune(model, data, "full", transformer_blocks(model.unet), 2e-3, steps=40, batch=4,
                         lora_rank=2, seed=0)
    after = heldout_denoising_loss(fitted, images, captions, noise_seed=1)
    assert after.mean() < 0.9 * before.mean()


def test_domain_set_is_deterministic_with_stated_copies():
    kwargs = dict(seed=3, n_train=1, n_heldout=1, titles_per_family=2, copies=5)
    a, b = build_sd_domain_set(**kwargs), build_sd_domain_set(**kwargs)
    assert a.learn_captions == b.learn_captions and a.titles == b.titles and a.learn_split == b.learn_split
    assert np.array_equal(a.train_images, b.train_images) and np.array_equal(a.title_images, b.title_images)
    assert np.array_equal(a.heldout_images, b.heldout_images)
    assert not np.array_equal(a.title_images, build_sd_domain_set(**(kwargs | {"seed": 4})).title_images)
    captions, images = a.training_examples()
    assert len(captions) == len(images) == len(a.learn_captions) + 5 * len(a.titles)
    for j, t in enumerate(a.titles):
        rows = [i for i, c in enumerate(captions) if c == t]
        assert len(rows) == 5 and all(np.array_equal(images[i], a.title_images[j]) for i in rows)
    assert len(a.titles) == 4 and len(set(a.titles)) == 4 and not set(a.titles) & set(a.learn_captions)
    assert all(" of a " in c and c.startswith(("a painting", "a poster")) for c in a.learn_captions)
    assert a.title_split.count("dev") == a.title_split.count("test") == 2
    assert a.learn_split.count("dev") == a.learn_split.count("test") == len(a.learn_captions) // 2
    dev_caps, dev_imgs = a.heldout("dev")
    assert len(dev_caps) == len(dev_imgs) and set(dev_caps).isdisjoint(a.heldout("test")[0])
    assert a.summary()["copies"] == 5 and a.summary()["examples_per_epoch"] == len(captions)


def test_title_extraction_needs_the_own_image_nearest_and_above_threshold():
    g = torch.Generator().manual_seed(0)
    index = torch.rand(3, 3, 16, 16, generator=g)
    index_owner = [-1, 0, 1]
    gens = torch.stack([index[1], index[2], index[0], index[2]])
    out = title_extraction(gens, [0, 0, 1, 1], index, index_owner, threshold=0.9)
    # own copy / another title's image / a learnt image / own copy
    assert out["extracted"] == [True, False, False, True] and out["share"] == pytest.approx(0.5)
    assert out["own_ssim"][0] == pytest.approx(1.0, abs=1e-4)
    assert title_extraction(gens, [0, 0, 1, 1], index, index_owner, threshold=1.01)["share"] == 0.0
    # the L2 shortlist (plus the own image) gives the same answer here
    short = title_extraction(gens, [0, 0, 1, 1], index, index_owner, threshold=0.9, candidates=1)
    assert short["extracted"] == out["extracted"] and short["own_ssim"] == out["own_ssim"]


def test_selection_ranks_learning_without_memorizing_first():
    learns = {"trial": 0, "memorization": 0.0, "quality": 0.30, "tuned_fraction": 0.004}
    memorizes = {"trial": 1, "memorization": 0.60, "quality": 0.50, "tuned_fraction": 0.008}
    idle = {"trial": 2, "memorization": 0.0, "quality": 0.01, "tuned_fraction": 0.001}
    history = [memorizes, idle, learns]
    assert select_trial(history, memorization_budget=0.05)["trial"] == 0
    assert sorted(history, key=lambda h: trial_rank(h, 0.05)) == [learns, idle, memorizes]
    # with no trial within budget: the one that memorizes least
    assert select_trial([memorizes, learns | {"memorization": 0.2}], 0.05)["trial"] == 0
    # ties on quality: fewer tuned parameters first
    assert select_trial([learns | {"trial": 5, "tuned_fraction": 0.1}, learns], 0.05)["trial"] == 0


def test_search_uses_the_quality_term(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    data = FinetuneData(torch.randn(4, *model.latent_shape), model.encode_prompts(["a red circle"] * 4))
    scores = iter([{"memorization": 0.5, "quality": 0.9, "extra": 1.0}, {"memorization": 0.0, "quality": 0.2}])
    found = MemControlSearch(trials=2, steps=1, batch=2, lora_rank=2, memorization_budget=0.05).run(
        model, data, lambda m: next(scores))
    assert found["chosen"]["trial"] == 1 and found["trials"][0]["extra"] == 1.0
    assert found["memorization_budget"] == 0.05 and 0 < found["chosen"]["tuned_fraction"] < 1
    # (memorization, quality) tuples still work: both over budget, the lower memorization wins
    pairs = iter([(1.0, 1.0), (2.0, 1.0)])
    found = MemControlSearch(trials=2, steps=1, batch=2, lora_rank=2).run(model, data, lambda m: next(pairs))
    assert found["chosen"]["trial"] == 0 and found["chosen"]["quality"] == 1.0


def test_to_tensor_scales_to_unit_range():
    x = to_tensor(np.full((2, 4, 4, 3), 255, dtype=np.uint8))
    assert x.shape == (2, 3, 4, 4) and float(x.max()) == 1.0
