"""MemControl on a fine-tuning set with a new domain: the quality term, the set builder, extraction and the
search's selection rule (issue 12, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.eval.finetune_domain import title_extraction, to_tensor
from diffmem.eval.quality import heldout_denoising_loss, relative_improvement
from diffmem.finetune.dataset import FinetuneSet
from diffmem.mitigators.memcontrol import (
    LR_RANGE,
    MemControlSearch,
    choose_point,
    memcontrol_memorization,
    pareto_front,
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
    from diffmem.finetune.trainer import FinetuneSettings, finetune

    data = FinetuneSet(images, [[c] for c in captions], [f"{i}.png" for i in range(4)])
    fitted = finetune(model, data, FinetuneSettings(family="full", lr=2e-3, steps=40, batch=4)).model
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
    assert a.summary()["copies"] == {"5": 4} and a.summary()["examples_per_epoch"] == len(captions)
    levels = build_sd_domain_set(seed=3, n_train=1, n_heldout=1, titles_per_family=2, copies=(1, 4),
                                 null_titles_per_family=3)
    assert levels.copies == [1] * 4 + [4] * 4 and levels.summary()["examples_per_epoch"] == 64 + 20
    assert len(levels.null_titles) == 6 and not set(levels.null_titles) & set(levels.titles)
    assert levels.finetune_set().captions[-1] == [levels.titles[-1]] and len(levels.finetune_set()) == 84


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


def test_pareto_front_and_choice_follow_the_stated_rules():
    trials = [{"trial": 0, "memorization": 3.0, "quality_loss": 0.10, "trained_share": 0.1},
              {"trial": 1, "memorization": 1.0, "quality_loss": 0.30, "trained_share": 0.1},
              {"trial": 2, "memorization": 2.0, "quality_loss": 0.40, "trained_share": 0.1},  # dominated by 1
              {"trial": 3, "memorization": 1.5, "quality_loss": 0.20, "trained_share": 0.1}]
    assert pareto_front(trials) == [1, 3, 0]  # MU L168-222: by memorization, each with a new lowest loss
    front = pareto_front(trials)
    assert choose_point(trials, front, budget=1.6)["trial"] == 3  # lowest loss within the budget
    assert choose_point(trials, front, budget=5.0)["trial"] == 0
    assert choose_point(trials, front, budget=0.5)["trial"] == 1  # none within: the least memorization


def _tiny_set(model, n: int, caption: str, seed: int) -> FinetuneSet:
    g = torch.Generator().manual_seed(seed)
    size = model.latent_shape[-1] * 2
    return FinetuneSet(torch.rand(n, 3, size, size, generator=g), [[caption]] * n, [f"{i}.png" for i in range(n)])


def test_memorization_signal_is_the_batch_max_of_guidance_norms(tiny_sd_folder):
    """HPO L258-403: per batch, the largest ||eps_c - eps_u|| at one random t per image; the mean over batches."""
    from diffmem.finetune.trainer import noised

    model = load_model(tiny_sd_folder)
    dup = _tiny_set(model, 5, "a red circle", 0)
    got = memcontrol_memorization(model, dup, batch=2, seed=3)
    latents = model.encode_images(dup.images)
    emb, empty = model.encode_prompts(["a red circle"] * 5), model.empty_embedding()
    g = torch.Generator().manual_seed(3 * 1000)
    maxima = []
    for i in range(0, 5, 2):
        zt, _, t = noised(model, latents[i:i + 2], g)
        with torch.no_grad():
            c = model.unet(zt, t, encoder_hidden_states=emb[i:i + 2]).sample
            u = model.unet(zt, t, encoder_hidden_states=empty.expand(len(zt), -1, -1)).sample
        maxima.append(float((c - u).flatten(1).norm(dim=1).max()))
    assert got == pytest.approx(float(np.mean(maxima)), rel=1e-5)


def test_search_masks_units_in_the_reference_range_and_keeps_the_front(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    data = _tiny_set(model, 6, "a painting of a cat", 1)
    losses = iter([0.5, 0.2, 0.3])
    found = MemControlSearch(family="difffit", trials=3, steps=1, batch=2).run(
        model, data, data.take([0, 1]), quality_loss=lambda m: next(losses))
    assert len(found["trials"]) == 3 and set(found["pareto"]) <= {0, 1, 2}
    for t in found["trials"]:
        assert LR_RANGE[0] <= t["learning_rate"] <= LR_RANGE[1]
        assert set(t["mask"]) == set(found["units"]) and 0 < t["trained_share"] < 1
    assert found["chosen"]["trial"] in found["pareto"]
    assert found["budget"] == pytest.approx(1.25 * found["base_memorization"])


def test_to_tensor_scales_to_unit_range():
    x = to_tensor(np.full((2, 4, 4, 3), 255, dtype=np.uint8))
    assert x.shape == (2, 3, 4, 4) and float(x.max()) == 1.0


def test_own_image_verdicts_call_caption_copies_and_not_regurgitation():
    """Image 0's caption draws its image (7 of 8); image 1 is drawn for any caption (30% of the never-trained
    captions' generations land on it), so its caption's 3 of 8 is not beyond chance; image 2's caption draws noise.
    The null rates are hand-computed: (1 + never-trained generations nearest the image) / (N + 1)."""
    from diffmem.eval.finetune_domain import own_image_verdicts

    g = torch.Generator().manual_seed(0)
    own_images = torch.rand(3, 3, 16, 16, generator=g)
    nulls = torch.rand(200, 3, 16, 16, generator=g)
    nulls[:60] = own_images[1]  # regurgitated: 60 of 200 never-trained generations are image 1
    null_best = np.where(np.arange(200) < 60, 1.0, 0.2)  # their best match to any fine-tuning image
    own_nearest = np.zeros((3, 8), dtype=bool)
    own_nearest[0, :7] = True
    own_nearest[1, :3] = True
    own_similarity = np.where(own_nearest, 0.99, 0.05)
    out = own_image_verdicts(own_similarity, own_nearest, nulls, null_best, own_images)
    assert out.nearest_null_rate.tolist() == pytest.approx([1 / 201, 61 / 201, 1 / 201])
    assert out.nearest.replicates.tolist() == [True, False, False]
    assert out.nearest.p_value[1] == pytest.approx(float(1 - stats_binom_cdf(2, 8, 61 / 201)))
    assert out.nearest.matches.tolist() == [7, 3, 0]


def stats_binom_cdf(x: int, n: int, p: float) -> float:
    from scipy import stats

    return float(stats.binom.cdf(x, n, p))
