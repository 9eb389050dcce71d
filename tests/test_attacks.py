"""Attacks and matchers: formulas against hand computations on tiny inputs and a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.attacks import AttackContext, TrainingIndex, make_attack
from diffmem.attacks.generate_filter import largest_clique, tiled_l2
from diffmem.attacks.one_step_blackbox import sobel_magnitude
from diffmem.attacks.retrigger import optimise_embeddings, start_embeddings
from diffmem.eval.matching import make_matcher
from diffmem.models import load_model


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


def test_tiled_l2_is_the_worst_tile():
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[0, :, :4, :4] = 0.5  # one of four 4x4 tiles differs
    d = tiled_l2(torch.cat([a, b]), tiles=2)
    assert d[0, 1] == pytest.approx(0.5)  # sqrt(48 * 0.25) / sqrt(48)
    assert d[0, 0] == 0 and d[1, 0] == d[0, 1]


def test_largest_clique():
    adj = np.zeros((5, 5), dtype=bool)
    for i, j in [(0, 1), (1, 2), (0, 2), (3, 4)]:
        adj[i, j] = adj[j, i] = True
    np.fill_diagonal(adj, True)
    assert sorted(largest_clique(adj)) == [0, 1, 2]


def test_sobel_on_a_vertical_step():
    x = torch.zeros(1, 1, 5, 5)
    x[..., 3:] = 1.0
    mag = sobel_magnitude(x)[0]
    assert mag[2, 2] == pytest.approx(4.0) and mag[2, 0] == 0  # |[-1 0 1; -2 0 2; -1 0 1] * step| = 4


def test_one_step_whitebox_matches_hand_computation(model):
    attack = make_attack("one-step-whitebox", seeds=2, guidance_scale=3.0)
    got = attack.run(model, ["a cat"], AttackContext(seed=9))["score"][0]
    sampler = model.make_sampler(1)
    x = model.initial_latents([9, 10])
    emb = model.encode_prompts(["a cat"])
    eps_u, eps_c = model.guided_pair(x, sampler.timesteps[0], emb)
    out = sampler.step(eps_u + 3.0 * (eps_c - eps_u), sampler.timesteps[0], x).prev_sample
    assert got == pytest.approx(float((x - out).pow(2).mean()), rel=1e-4)


def test_one_step_blackbox_matches_hand_computation(model):
    """Share of pixels whose Sobel magnitude (summed over channels) exceeds the threshold in more than half of the
    one-step generations of seeds ctx.seed + j, computed by hand with a plain loop over pixels and seeds."""
    from diffmem.attacks.one_step_blackbox import sobel_magnitude

    prompts, k = ["a cat", "a dog"], 3
    # a threshold inside the range of this random model's magnitudes, so the score is not 0 or 1 by construction
    thr = float(sobel_magnitude(model.sample(prompts[:1], [4], num_inference_steps=1).images).median())
    out = make_attack("one-step-blackbox", seeds=k, edge_threshold=thr).run(model, prompts, AttackContext(seed=4))
    kx = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    for p, got in zip(prompts, out["score"]):
        images = model.sample([p] * k, [4 + j for j in range(k)], num_inference_steps=1).images.double()
        _, c, h, w = images.shape
        votes = torch.zeros(h, w)
        for img in images:
            for y in range(h):
                for x in range(w):
                    mag = 0.0
                    for ch in range(c):
                        gx = gy = 0.0
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                v = float(img[ch, min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)])
                                gx += kx[dy + 1][dx + 1] * v
                                gy += kx[dx + 1][dy + 1] * v
                        mag += (gx * gx + gy * gy) ** 0.5
                    votes[y, x] += mag > thr
        expected = float((votes > k / 2).float().mean())
        assert got == pytest.approx(expected, abs=1.5 / (h * w))  # at most one pixel on float round-off
    assert 0 < out["score"].max() < 1  # neither degenerate: some pixels are consistent edges, not all


def test_ssim_matcher_finds_exact_copies_and_labels_them():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 3, 16, 16, generator=g)
    index = TrainingIndex(train, np.arange(20) // 2, make_matcher("ssim").fit(train), threshold=0.9)
    queries = torch.stack([train[5], train[7], torch.rand(3, 16, 16, generator=g)])
    m = index.matcher.match(queries)
    assert m.index[:2].tolist() == [5, 7] and m.similarity[0] == pytest.approx(1.0, abs=1e-4)
    assert index.label(m.similarity, m.index, [2, 0, 1]) == ["matching_verbatim", "template_verbatim", "none"]
    # no own item known: a match is reported as unattributed, never as another caption's image
    assert index.label(m.similarity, m.index, [None, None, None]) == ["unattributed", "unattributed", "none"]
    for name in ("l2", "deepssim"):
        if name == "deepssim":
            from diffmem.eval.deepssim import DeepSSIM, DeepSSIMConfig

            matcher = make_matcher(name, embedder=DeepSSIM(DeepSSIMConfig(dim=8, width=4))).fit(train)
        else:
            matcher = make_matcher(name).fit(train)
        assert matcher.match(train[3:4]).index.item() == 3


def test_generate_filter_flags_a_prompt_whose_generations_coincide(model):
    train = torch.rand(4, 3, 16, 16)
    index = TrainingIndex(train, np.arange(4), make_matcher("l2").fit(train), threshold=-1.0)
    # guidance 0 on a random model: every seed gives a different image; delta=10 joins everything
    loose = make_attack("generate-filter", generations=4, min_clique=3, delta=10.0, steps=2)
    strict = make_attack("generate-filter", generations=4, min_clique=3, delta=0.0, steps=2)
    ctx = AttackContext(index=index, own_items=[0])
    assert loose.run(model, ["a cat"], ctx)["flagged"] == [True]
    out = strict.run(model, ["a cat"], ctx)
    assert out["flagged"] == [False] and out["score"][0] == pytest.approx(1 / 4)


def test_retrigger_search_lowers_the_denoising_loss_on_the_target(model):
    target = model.encode_images(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    e0 = model.encode_prompts(["a cat"])

    def loss(e):
        g = torch.Generator().manual_seed(123)
        t = torch.randint(0, 1000, (64,), generator=g)
        noise = torch.randn((64, *target.shape[1:]), generator=g)
        a = model.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            pred = model.predict_noise(a.sqrt() * target + (1 - a).sqrt() * noise, t, e.expand(64, -1, -1))
        return float((pred - noise).pow(2).mean())

    e = optimise_embeddings(model, e0, target, steps=20, lr=0.05, batch=8, max_relative_norm=None, seed=0)
    assert loss(e) < loss(e0)
    bounded = optimise_embeddings(model, e0, target, steps=5, lr=0.5, batch=4, max_relative_norm=0.1, seed=0)
    assert float((bounded - e0).norm() / e0.norm()) <= 0.1 + 1e-5


def test_dori_runs_the_papers_settings_and_the_tuned_attack_stays_a_second_row():
    dori, tuned = make_attack("dori"), make_attack("retrigger")
    assert (dori.lr, dori.batch, dori.steps, dori.max_relative_norm, dori.starts) == (0.1, 8, 50, None, 3)
    assert (tuned.lr, tuned.steps, tuned.max_relative_norm, tuned.starts) == (0.01, 30, 0.3, 1)
    assert make_attack("retrigger-tuned") == tuned
    assert dori.unet_calls_per_prompt() == 3 * (50 * 8 + 2 * 25 * 4) + 2 * 25


def test_dori_starts_differ_and_a_bound_holds_from_the_prompt_embedding(model):
    e0 = model.encode_prompts(["a cat", "a dog"])
    starts = [start_embeddings(e0, s, 0.1, seed=0) for s in range(3)]
    assert torch.equal(starts[0], e0)  # the first start is the prompt's own embedding
    for s in (1, 2):
        rel = (starts[s] - e0).flatten(1).norm(dim=1) / (e0.flatten(1).std(dim=1) * e0[0].numel() ** 0.5)
        assert rel.tolist() == pytest.approx([0.1, 0.1], rel=0.05)  # noise of 0.1 x the element std
    assert not torch.allclose(starts[1], starts[2])
    target = model.encode_images(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    far = optimise_embeddings(model, e0, target, steps=3, lr=0.5, batch=2, max_relative_norm=0.05, seed=0,
                              init=starts[1])
    shift = (far - e0).flatten(1).norm(dim=1) / e0.flatten(1).norm(dim=1)
    assert (shift <= 0.05 + 1e-5).all()


def test_dori_keeps_each_prompts_best_start(model):
    train = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # threshold between the images' similarities: some generations count as replicating, others not
    index = TrainingIndex(train, np.arange(3), make_matcher("l2").fit(train), threshold=-0.3)
    attack = make_attack("dori", steps=2, batch=2, starts=2, generations=2, sample_steps=2)
    out = attack.run(model, ["a cat", "a dog"], AttackContext(index=index, own_items=[0, 1], seed=0))
    per_start = np.asarray(out["replication_rate_per_start"])
    assert per_start.shape == (2, 2)
    assert out["replication_rate"] == per_start.max(1).tolist()
    assert out["flagged"] == (per_start.max(1) > 0).tolist()
    assert all(s > 0 for s in out["embedding_shift"])  # no bound, and every start moved


def test_extract_cli_on_an_image_folder_resumes_and_labels(tiny_sd_folder, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from diffmem.cli.main import main

    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(5):
        pixels = (np.random.default_rng(i).random((16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na tree\n", encoding="utf-8")
    args = ["extract", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--train-index", str(folder),
            "--attack", "one-step-whitebox", "--attack", "generate-filter", "--matcher", "l2", "--batch-size", "2",
            "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    table = pq.read_table(tmp_path / "out" / "extraction.parquet")
    assert table.num_rows == 3
    expected = {"one-step-whitebox.score", "generate-filter.score", "generate-filter.match_label"}
    assert expected <= set(table.column_names)
    # a text prompt file names no own item: no match can be called another caption's image
    assert set(table.column("generate-filter.match_label").to_pylist()) <= {"unattributed", "none"}
    assert main(args) == 0  # a rerun of a finished extraction only re-merges
    assert main([*args[:-1], str(tmp_path / "o2"), "--option", "generate-filter.generations=3"]) == 0
    assert main([*args[:-1], str(tmp_path / "o3"), "--option", "retrigger.lr=0.01"]) == 2  # not a chosen attack
    assert main([*args[:-1], str(tmp_path / "out"), "--seed", "3"]) == 2  # other settings: refused


def test_matchers_rank_the_k_nearest_and_give_distances():
    g = torch.Generator().manual_seed(1)
    train = torch.rand(12, 3, 16, 16, generator=g)
    query = (train[4:5] + 0.02 * torch.randn(1, 3, 16, 16, generator=g)).clamp(0, 1)
    from diffmem.eval.deepssim import DeepSSIM, DeepSSIMConfig

    for matcher in (make_matcher("ssim"), make_matcher("l2"),
                    make_matcher("deepssim", embedder=DeepSSIM(DeepSSIMConfig(dim=8, width=4)))):
        matcher.fit(train)
        top = matcher.match_top(query, 3)
        assert top.similarity.shape == (1, 3) and top.index.shape == (1, 3)
        assert (top.similarity[0, :-1] >= top.similarity[0, 1:]).all()
        assert top.index[0, 0].item() == matcher.match(query).index.item()
        assert (matcher.distance(top.similarity) >= 0).all()
        with pytest.raises(ValueError, match="k must be"):
            matcher.match_top(query, 13)
    assert make_matcher("ssim").fit(train).match_top(query, 1).index.item() == 4
    # the values, by hand: the 3 best of every training image's SSIM / negative pixel RMS distance to the query
    from diffmem.eval.similarity import ssim_pairs

    ssim_all = ssim_pairs(query.expand(12, -1, -1, -1), train)
    rms_all = -((query - train) ** 2).flatten(1).mean(1).sqrt()
    for name, values in (("ssim", ssim_all), ("l2", rms_all)):
        top = make_matcher(name, **({"candidates": 12} if name == "ssim" else {})).fit(train).match_top(query, 3)
        best, order = values.topk(3)
        assert top.index[0].tolist() == order.tolist()
        torch.testing.assert_close(top.similarity[0], best, rtol=1e-5, atol=1e-5)  # float32: batch order
