"""Mitigators on a tiny random SD model: mechanics, saved checkpoints, untouched inputs, bad input."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffmem.cli.main import main
from diffmem.errors import DiffmemError
from diffmem.mitigators import make_mitigator
from diffmem.mitigators.hooks import find_modules, fuse_adapters, sampling_column_norms
from diffmem.mitigators.prompt_adaptation import adapt_embeddings, adapt_per_generation, adaptation_loss
from diffmem.models import load_model

MEM = ["a red circle in the top left and a blue cross in the center on a gray background", "a photo of a cat"]
ORD = ["a small green square in the center on a white background", "a dog", "a house", "a tree by a lake"]


def folder_digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


def test_embedding_noise_is_absolute_on_both_halves_and_batch_independent(model):
    """DCR adds 0.1 * N(0, I) to both CFG halves, per call: a prompt alone equals it inside a batch."""
    mit = make_mitigator("embedding-noise")
    view = mit.apply(model)
    cond, uncond = mit.perturb(model, MEM[:1], ["generation 3"])
    both_c, both_u = mit.perturb(model, [ORD[0], MEM[0]], ["generation 3", "generation 3"])
    torch.testing.assert_close(cond[0], both_c[1])
    torch.testing.assert_close(uncond[0], both_u[1])
    # absolute scale: the added noise has std 0.1 whatever the embedding's spread
    assert float((cond - model.encode_prompts(MEM[:1])).std()) == pytest.approx(0.1, rel=0.05)
    assert float((uncond - model.empty_embedding()).std()) == pytest.approx(0.1, rel=0.05)
    alone = view.sample(MEM[:1], [3], num_inference_steps=2).images
    batch = view.sample([ORD[0], MEM[0]], [3, 3], num_inference_steps=2).images
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=1e-4)
    two = view.sample(MEM[:1] * 2, [3, 4], num_inference_steps=2).images
    assert (two[0] - two[1]).abs().max() > 1e-4
    plain = model.sample(MEM[:1], [3], num_inference_steps=2).images
    assert (plain[0] - alone[0]).abs().max() > 1e-4
    # outside sampling: fresh per call, the empty prompt alone exact
    assert not torch.allclose(view.encode_prompts(MEM), view.encode_prompts(MEM))
    torch.testing.assert_close(view.encode_prompts([""]), model.encode_prompts([""]))


def test_random_tokens_draw_fresh_clip_tokens_for_every_generation(model):
    mit = make_mitigator("random-tokens")
    assert mit.n_tokens == 2  # DCR's --rand_aug_repeats default
    a, b = mit.augmented(model, [MEM[1], MEM[1]], ["generation 0", "generation 1"])
    assert a != b and len(a.split(" ")) == len(b.split(" ")) == len(MEM[1].split(" ")) + 2
    assert mit.augmented(model, [MEM[1]], ["generation 0"]) == [a]  # deterministic, batch-independent
    assert mit.augmented(model, [ORD[0], MEM[1]], ["generation 0"] * 2)[1] == a
    view = mit.apply(model)
    images = view.sample([MEM[1]] * 2, [0, 1], num_inference_steps=2).images
    plain = model.sample([MEM[1]] * 2, [0, 1], num_inference_steps=2).images
    torch.testing.assert_close(images[0], view.sample([MEM[1]], [0], num_inference_steps=2).images[0],
                               atol=1e-5, rtol=1e-4)
    assert (images - plain).abs().flatten(1).max(1).values.min() > 1e-4
    assert (mit.augmented(model, [""], ["generation 0"]) == [""])


def _adaptation_setup(model):
    t = int(model.make_sampler(50).timesteps[0])
    x = model.initial_latents([0, 1])
    eps_u = model.predict_noise(x, t, model.empty_embedding()).float()
    return t, x, eps_u


def test_prompt_adaptation_lowers_the_loss_with_the_reference_optimiser(model):
    emb = model.encode_prompts(MEM)
    t, x, eps_u = _adaptation_setup(model)
    before = adaptation_loss(model, emb, x, t, eps_u)
    # the reference's loss: one L2 norm over all generations' guidance together
    d = model.predict_noise(x.repeat(2, 1, 1, 1), t, emb.repeat_interleave(2, 0)).float() - eps_u.repeat(2, 1, 1, 1)
    torch.testing.assert_close(before, d.view(2, -1).norm(dim=1))
    adapted, steps = adapt_embeddings(model, emb, target=0.0, lr=0.05, max_steps=5, latents=x)
    after = adaptation_loss(model, adapted, x, t, eps_u)
    assert (after < before).all() and steps.tolist() == [5, 5]
    # start token: no gradient, only AdamW's decoupled decay (torch default 0.01), as in the reference
    torch.testing.assert_close(adapted[:, 0], emb[:, 0] * (1 - 0.05 * 0.01) ** 5)
    mit = make_mitigator("prompt-adaptation", draws=2)
    mit.fit(model, MEM, ORD)
    # the target is the ordinary prompts' 90% quantile of the adaptation loss, on the same two draws (seeds 0, 1)
    ordinary = adaptation_loss(model, model.encode_prompts(ORD), x, t, eps_u)
    assert mit.target == pytest.approx(float(np.quantile(ordinary.numpy(), 0.9)), rel=1e-6)


def test_prompt_adaptation_freezes_done_prompts_and_is_batch_independent(model):
    emb = model.encode_prompts(MEM + ORD[:2])
    t, x, eps_u = _adaptation_setup(model)
    before = adaptation_loss(model, emb, x, t, eps_u)
    target = 0.5  # one prompt starts done, one reaches it mid-way, two never do
    adapted, steps = adapt_embeddings(model, emb, target=target, lr=0.05, max_steps=8, latents=x)
    after = adaptation_loss(model, adapted, x, t, eps_u)
    done = steps < 8
    assert steps.tolist()[2] == 8 and steps.tolist()[3] == 0 and 0 < steps.tolist()[1] < 8
    assert (after[done] <= target + 1e-5).all()  # no done prompt drifts back above target
    torch.testing.assert_close(adapted[before <= target], emb[before <= target].float())  # done at once: untouched
    for i in range(len(emb)):
        alone, alone_steps = adapt_embeddings(model, emb[i : i + 1], target=target, lr=0.05, max_steps=8, latents=x)
        torch.testing.assert_close(alone[0], adapted[i], atol=1e-4, rtol=1e-4)
        assert alone_steps.item() == steps[i].item()


def test_prompt_adaptation_adapts_each_prompt_on_its_own_generations(model):
    mit = make_mitigator("prompt-adaptation", target=0.0, max_steps=2)
    view = mit.apply(model)
    emb = adapt_per_generation(mit, model, [MEM[0], MEM[1], MEM[0]], [5, 7, 6])
    own = mit.adapt(model, model.encode_prompts(MEM[:1]), model.initial_latents([5, 6]))
    torch.testing.assert_close(emb[0], own[0])
    torch.testing.assert_close(emb[2], own[0])
    images = view.sample([MEM[0], MEM[0]], [5, 6], num_inference_steps=2).images
    direct = model.sample(embeddings=own.repeat(2, 1, 1), seeds=[5, 6], num_inference_steps=2).images
    torch.testing.assert_close(images, direct)
    with torch.no_grad():  # an attack's probe samples under no_grad; adaptation still takes its steps
        quiet = view.sample([MEM[0], MEM[0]], [5, 6], num_inference_steps=2).images
    torch.testing.assert_close(quiet, direct)


def test_subspace_pruning_writes_a_loadable_checkpoint_and_keeps_the_input(model, tiny_sd_folder, tmp_path):
    before = folder_digest(tiny_sd_folder)
    mit = make_mitigator("subspace-pruning", fraction=0.05, timesteps=2)
    mit.fit(model, MEM, ORD)
    info = mit.describe_fit()
    assert info["total_pruned"] > 0 and 0 < info["pruned_share"] < 0.05 * 10
    out = mit.save(tmp_path / "pruned", model)
    reloaded = load_model(out)
    ff = [m for n, m in reloaded.unet.named_modules() if n.endswith("ff.net.2")][0]
    assert (ff.weight == 0).sum() > 0
    assert json.loads((out / "mitigation.json").read_text())["mitigator"]["fraction"] == 0.05
    assert folder_digest(tiny_sd_folder) == before
    original_ff = [m for n, m in model.unet.named_modules() if n.endswith("ff.net.2")][0]
    assert (original_ff.weight == 0).sum() == 0  # the in-memory original is untouched too


def test_subspace_pruning_reads_normalised_cfg_activations_per_step(model):
    """ConceptPrune's column norms: unit token rows, both CFG halves, one fixed seed; sums of squares add."""
    modules = find_modules(model.unet, r"ff\.net\.2$")
    one = sampling_column_norms(model, [""], modules, steps=3, seed=0)
    two = sampling_column_norms(model, ["", ""], modules, steps=3, seed=0)
    a, b = (sampling_column_norms(model, [p], modules, steps=3, seed=0) for p in MEM)
    both = sampling_column_norms(model, MEM, modules, steps=3, seed=0)
    for name in modules:
        torch.testing.assert_close(two[name], one[name] * 2 ** 0.5)  # the empty baseline at equal counts
        torch.testing.assert_close(both[name], (a[name] ** 2 + b[name] ** 2).sqrt(), atol=1e-5, rtol=1e-4)
        # every token row has unit norm: the squared column norms sum to the number of rows, 2 CFG halves x
        # the layer's spatial positions (8x8 latents: 64 at full, 16 at half resolution)
        rows = (one[name] ** 2).sum(1).tolist()
        assert rows[0] in (pytest.approx(128), pytest.approx(32)) and rows == pytest.approx([rows[0]] * 3)
        assert not torch.allclose(one[name][0], one[name][2])  # a mask per step reads a different signal


def test_subspace_pruning_baseline_is_count_free_and_the_mask_a_union_over_steps(model):
    ordinary = make_mitigator("subspace-pruning", baseline="ordinary", timesteps=2)
    ordinary.fit(model, MEM, ORD)
    twice = make_mitigator("subspace-pruning", baseline="ordinary", timesteps=2)
    twice.fit(model, MEM, ORD + ORD)  # the oracle: the ordinary list passed twice leaves the mask unchanged
    for name, mask in ordinary._masks.items():
        assert torch.equal(mask, twice._masks[name])
    faithful = make_mitigator("subspace-pruning", timesteps=2)
    faithful.fit(model, MEM, [])  # the empty prompt is the baseline: no ordinary list needed
    first = make_mitigator("subspace-pruning", timesteps=1)
    first.fit(model, MEM, [])
    assert all((first._masks[n] & ~m).sum() == 0 for n, m in faithful._masks.items())  # union grows with steps
    assert sum(int(m.sum()) for m in faithful._masks.values()) > sum(int(m.sum()) for m in first._masks.values())
    for mask in faithful._masks.values():  # at most k = max(1, int(0.01 * in)) per row and step
        k = max(1, int(0.01 * mask.shape[1]))
        assert int(mask.sum(1).max()) <= 2 * k
    variant = make_mitigator("subspace-pruning-first-step", draws=2)
    assert variant.fraction == 0.1
    variant.fit(model, MEM, ORD)
    assert variant.describe_fit()["total_pruned"] > 0


def _tiny_unet(sd2: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if sd2:  # SD 2.x: linear projections in the transformers, per-level head dims, cross-attention everywhere
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                    attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=32)


@pytest.mark.parametrize("sd2", [False, True])
def test_subspace_pruning_layers_on_sd1_sd2_and_unfused_lora_unets(sd2):
    from peft import LoraConfig

    unet = _tiny_unet(sd2)
    expected = sorted(n.rsplit(".ff.", 1)[0] for n, m in unet.named_modules()
                      if n.endswith("transformer_blocks.0"))  # one feed-forward per transformer block
    found = find_modules(unet, r"ff\.net\.2$")
    assert sorted(n.rsplit(".ff.", 1)[0] for n in found) == expected and len(expected) == 4
    assert all(m.in_features == 4 * m.out_features for m in found.values())  # GEGLU output: 4 x the width
    ref = {n: m.weight.detach().clone() for n, m in found.items()}
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["ff.net.2", "to_v"]))
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500])
    c = torch.randn(1, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_adapter = unet(x, t, encoder_hidden_states=c).sample
    wrapped = find_modules(unet, r"ff\.net\.2$")  # the wrappers, under the layers' own names
    assert sorted(wrapped) == sorted(found) and all(hasattr(m, "base_layer") for m in wrapped.values())
    assert fuse_adapters(unet) and not fuse_adapters(unet)
    fused = find_modules(unet, r"ff\.net\.2$")
    assert sorted(fused) == sorted(found)
    assert all(not torch.equal(fused[n].weight, ref[n]) for n in fused)  # the weight the model runs with
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=c).sample, with_adapter, atol=1e-5, rtol=1e-4)


def test_subspace_pruning_fuses_an_unfused_lora_and_saves_plain_weights(model, tmp_path):
    from peft import LoraConfig

    view = copy.copy(model)
    view.unet = copy.deepcopy(model.unet)
    view.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["ff.net.2"]))
    mit = make_mitigator("subspace-pruning", timesteps=1)
    mit.fit(view, MEM, [])
    assert mit.describe_fit()["lora_fused"] and mit.describe_fit()["total_pruned"] > 0
    assert set(mit.patched().unet.state_dict()) == set(model.unet.state_dict())
    assert any("lora_" in n for n in view.unet.state_dict())  # the input model keeps its adapter


def test_nemo_refinement_keeps_only_the_neurons_that_matter():
    from diffmem.mitigators.nemo import NeMoSettings

    def signal(sel):  # only neuron 3 of layer "b" moves the signal
        return 0.2 if 3 in sel.get("b", []) else 0.9

    widest = {"a": [0, 1, 2], "b": [1, 3, 5], "c": [7]}
    assert NeMoSettings.refine(widest, signal, target=0.2) == {"b": [3]}
    assert NeMoSettings.refine(widest, signal, target=0.1) == widest  # nothing can go without losing the target


def test_nemo_signal_threshold_and_two_sided_selection(model):
    from diffmem.mitigators.nemo import NeMoSettings, max_pairwise_ssim, noise_differences

    nemo = NeMoSettings(seeds=3)
    modules = nemo._modules(model.unet)
    assert list(modules) == sorted(modules) and all(n.endswith("attn2.to_v") for n in modules)
    latents, t = nemo._setup(model)
    assert t == int(model.make_sampler(50).timesteps[1])  # the second step of 50, latents not stepped
    d = noise_differences(model, model.encode_prompts(ORD[:1]), latents, t, modules, {})
    assert float(d.amin((2, 3)).max()) == 0.0 and float(d.amax((2, 3)).min()) == pytest.approx(1.0)
    eps = model.predict_noise(latents, t, model.encode_prompts(ORD[:1])).float() - latents
    torch.testing.assert_close(d[0, 0], (eps[0, 0] - eps[0, 0].min()) / (eps[0, 0].max() - eps[0, 0].min()))
    peaks = [float(max_pairwise_ssim(noise_differences(model, model.encode_prompts([p]), latents, t, modules,
                                                       {})).max()) for p in ORD]
    assert nemo.derive_threshold(model, ORD) == pytest.approx(float(np.mean(peaks) + np.std(peaks)))


@pytest.fixture(scope="module")
def nemo_fit(model):
    """NeMo on the tiny model with a threshold no blocking reaches: it must refine against the signal reached."""
    mit = make_mitigator("nemo", seeds=3, theta_step=2.0, threshold=-1.0)
    mit.fit(model, MEM, ORD)
    return mit


def test_nemo_never_returns_an_unrefined_widest_set(nemo_fit):
    info = nemo_fit.describe_fit()
    assert info["memorized_by_signal"] == 2 and info["reached_threshold"] == 0
    assert all(0 <= n < initial for n, initial in zip(info["neurons_per_prompt"], info["initial_neurons"]))
    assert set(nemo_fit.neurons) == set(MEM)


def test_nemo_blocks_each_prompts_own_neurons_at_inference(model, tmp_path):
    from diffmem.mitigators.base import load_mitigation
    from diffmem.mitigators.hooks import zeroed_channels

    layer = sorted(n for n, _ in model.unet.named_modules() if n.endswith("attn2.to_v") and "up_" not in n)[0]
    mit = make_mitigator("nemo", threshold=0.5, neurons={MEM[0]: {layer: [0, 1, 2, 3]}})
    view = mit.apply(model)
    out = view.sample([MEM[0], ORD[0], MEM[1]], [0, 0, 1], num_inference_steps=2).images
    modules = dict(model.unet.named_modules())
    with zeroed_channels({layer: modules[layer]}, {layer: torch.tensor([0, 1, 2, 3])}):
        blocked = model.sample([MEM[0]], [0], num_inference_steps=2).images
    plain = model.sample([ORD[0], MEM[1]], [0, 1], num_inference_steps=2).images
    torch.testing.assert_close(out[0], blocked[0])
    torch.testing.assert_close(out[1:], plain)
    assert (out[0] - model.sample([MEM[0]], [0], num_inference_steps=2).images[0]).abs().max() > 1e-5
    # embeddings without a prompt (an embedding attack): the union stays blocked
    x, emb = model.initial_latents([0]), model.encode_prompts(ORD[:1])
    with zeroed_channels({layer: modules[layer]}, {layer: torch.tensor([0, 1, 2, 3])}):
        torch.testing.assert_close(view.predict_noise(x, 500, emb), model.predict_noise(x, 500, emb))
    # the mitigation file carries the per-prompt sets and re-applies them
    path = mit.save(tmp_path / "nemo", model)
    again = load_mitigation(path)
    assert again.neurons == mit.neurons
    torch.testing.assert_close(again.apply(model).sample([MEM[0]], [0], num_inference_steps=2).images, blocked)


def test_nemo_localises_unseen_prompts_and_attacks_meet_each_prompts_neurons(nemo_fit, model, monkeypatch):
    """NeMo acts per prompt: a prompt it was not fitted on is localised when first sampled (against the fit's
    statistics), and an embedding attack on a prompt runs with that prompt's own neurons blocked."""
    from diffmem.attacks.base import AttackContext
    from diffmem.attacks.retrigger import EmbeddingRetrigger

    view = nemo_fit.apply(model)
    assert view.prompt_specific and not model.prompt_specific and model.for_prompt("x") is model
    mu = {n: torch.tensor(v["mu"]) for n, v in nemo_fit.statistics.items()}
    sigma = {n: torch.tensor(v["sigma"]) for n, v in nemo_fit.statistics.items()}
    expected, _ = nemo_fit.localise_prompts(model, [ORD[1]], mu, sigma)
    view.sample([ORD[1]], [0], num_inference_steps=2)
    assert nemo_fit._localised[ORD[1]] == expected[ORD[1]] and ORD[1] not in nemo_fit.neurons
    assert view.for_prompt(MEM[0])._blocking == nemo_fit.neurons[MEM[0]]
    seen = []

    def one_prompt(self, m, prompts, ctx):
        seen.append((prompts[0], m._blocking, ctx.own_items))
        return {"replication_rate": [0.5], "score": np.array([0.5])}

    monkeypatch.setattr(EmbeddingRetrigger, "run", one_prompt)
    out = EmbeddingRetrigger().run_each(view, MEM, AttackContext(own_items=[3, 4]))
    assert seen == [(MEM[0], nemo_fit.neurons[MEM[0]], [3]), (MEM[1], nemo_fit.neurons[MEM[1]], [4])]
    assert out["replication_rate"] == [0.5, 0.5] and out["score"].tolist() == [0.5, 0.5]


def test_nemo_statistics_come_from_the_statistics_prompts(model, monkeypatch):
    """NeMo's z-scores are measured against the mean and (n - 1) std of the first-step mean |value activation|
    of the statistics prompts (the memorized captions' own distribution), not of the ordinary prompts."""
    from diffmem.mitigators.nemo import NeMo

    mit = make_mitigator("nemo", seeds=3, theta_step=2.0, threshold=-1.0)
    modules = mit._modules(model.unet)
    stats_prompts = ["a painting of a lighthouse", "a poster of a harbor", "a quiet river"]
    mu, sigma = mit.activation_statistics(model, stats_prompts, modules)
    name = sorted(modules)[0]
    seen = []
    handle = modules[name].register_forward_hook(lambda m, a, out: seen.append(out[0].abs().mean(0)))
    x = model.initial_latents([mit.seed])
    t = int(model.make_sampler(50).timesteps[0])
    with torch.no_grad():
        for p in stats_prompts:
            model.predict_noise(x, t, model.encode_prompts([p]))
    handle.remove()
    per_prompt = torch.stack(seen)
    torch.testing.assert_close(mu[name], per_prompt.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma[name], per_prompt.std(0).clamp_min(1e-6), rtol=1e-5, atol=1e-6)
    used = []
    real = NeMo.activation_statistics
    monkeypatch.setattr(NeMo, "activation_statistics",
                        lambda self, m, prompts, mods: used.append(list(prompts)) or real(self, m, prompts, mods))
    mit.fit(model, MEM[:1], ORD, statistics_prompts=stats_prompts)
    assert used == [stats_prompts] and mit.describe_fit()["statistics_prompts"] == 3
    mit.fit(model, MEM[:1], ORD)
    assert used[-1] == ORD and mit.describe_fit()["statistics_from"] == "ordinary prompts"


def test_nemo_union_is_a_pruned_checkpoint_with_its_share_reported(model, nemo_fit):
    mit = make_mitigator("nemo-union", seeds=3, theta_step=2.0, threshold=-1.0)
    mit.fit(model, MEM, ORD)
    info = mit.describe_fit()
    assert info["neurons"] == __import__("diffmem.mitigators.nemo", fromlist=["union"]).union(nemo_fit.neurons)
    total = sum(m.out_features for n, m in model.unet.named_modules()
                if n.endswith("attn2.to_v") and ("down_blocks" in n or "mid_block" in n))
    assert info["neuron_share_removed"] == pytest.approx(info["total_neurons"] / total)
    for name, rows in info["neurons"].items():
        assert (dict(mit.patched().unet.named_modules())[name].weight[rows] == 0).all()


TINY_ADV = {"rounds": 1, "outer_steps": 2, "inner_steps": 2, "inner_batch": 2, "batch": 2, "retain_prompts": 2,
            "sample_steps": 2}


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
    before, after = a.state_dict(), b.state_dict()
    assert set(after) == set(before)  # the same tensors: the saved checkpoint loads as the input did
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_adversarial_finetune_trains_the_full_unet_as_dori(model):
    """Dori fine-tunes the whole UNet (LoRA did not suffice): weights outside any attention projection move."""
    mit = make_mitigator("adversarial-finetune", lr=1e-3, **TINY_ADV)
    mit.fit(model, MEM, ORD, surrogates=torch.rand(2, 3, 16, 16))
    changed = _changed(model.unet, mit.patched().unet)
    assert {"conv_in.weight", "conv_out.weight"} <= changed
    assert any(".resnets." in k for k in changed) and any(".ff.net." in k for k in changed)
    assert not any("lora" in k for k in mit.patched().unet.state_dict())
    info = mit.describe_fit()
    assert info["mode"] == "full" and info["retain"].startswith("diffusion loss")


def test_adversarial_finetune_is_deterministic_given_a_seed(model):
    surrogates = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = []
    for seed in (3, 3, 4):
        mit = make_mitigator("adversarial-finetune", lr=1e-3, seed=seed, **TINY_ADV)
        mit.fit(model, MEM, ORD, surrogates=surrogates)
        runs.append(mit.patched().unet.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_adversarial_finetune_surrogates_are_the_pruned_models_generations(model, monkeypatch):
    """Dori's surrogates: the generations, for the original prompts, of the model under a pruning mitigation
    (NeMo by default), fitted first on the memorized prompts."""
    from diffmem.mitigators.nemo import NeMo

    fitted, drawn = [], []
    real_fit, real_apply = NeMo.fit, NeMo.apply

    def fit(self, model, memorized, ordinary, statistics_prompts=None):
        fitted.append((list(memorized), list(ordinary), statistics_prompts))
        return real_fit(self, model, memorized, ordinary, statistics_prompts=statistics_prompts)

    def apply(self, model):
        view = real_apply(self, model)
        sample = view.sample

        def spy(*args, **kwargs):
            out = sample(*args, **kwargs)
            drawn.append(out.images)
            return out

        view.sample = spy
        return view

    monkeypatch.setattr(NeMo, "fit", fit)
    monkeypatch.setattr(NeMo, "apply", apply)
    mit = make_mitigator("adversarial-finetune", surrogate_candidates=1, surrogate_max_ssim=1.01,
                         surrogate_options={"seeds": 3, "theta_step": 2.0, "threshold": -1.0}, **TINY_ADV)
    mit.fit(model, MEM, ORD, statistics_prompts=ORD[1:])
    assert fitted == [(MEM, ORD, ORD[1:])]  # fitted once, on the memorized prompts, with the statistics prompts
    assert len(drawn) == 1  # one candidate, drawn by the blocked model
    torch.testing.assert_close(mit._forget.surrogates, drawn[0])
    assert mit._forget.prompts == MEM
    assert mit.describe_fit()["surrogates"]["source"]["name"] == "nemo"


def test_adversarial_finetune_retain_term_is_the_plain_diffusion_loss(model):
    """Dori's retain term, by hand: mean ||eps_theta(sqrt(a) z + sqrt(1 - a) eps, t, c) - eps||^2 over the retain
    pairs drawn; the LoRA variant's distillation term is 0 on the unchanged model, where this one is not."""
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mit = make_mitigator("adversarial-finetune", batch=1, retain_prompts=3)
    mit.prepare_retain(model, ORD[:3], images)
    with torch.no_grad():
        got = float(mit.retain_loss(model, torch.Generator().manual_seed(7)))
        g = torch.Generator().manual_seed(7)
        idx = torch.randint(3, (2,), generator=g)
        z = model.encode_images(images)[idx]
        t = torch.randint(0, len(model.alphas_cumprod), (2,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        expected = 0.0
        for i in range(2):
            a = float(model.alphas_cumprod[t[i]])
            x = a**0.5 * z[i : i + 1] + (1 - a) ** 0.5 * noise[i : i + 1]
            eps = model.unet(x, t[i : i + 1], encoder_hidden_states=model.encode_prompts([ORD[int(idx[i])]])).sample
            expected += float((eps - noise[i : i + 1]).pow(2).mean()) / 2
    assert got == pytest.approx(expected, rel=1e-4)
    assert mit.describe_fit()["retain"] == "diffusion loss on ordinary prompts with given images"
    lora = make_mitigator("adversarial-finetune-lora", batch=1, retain_prompts=3, sample_steps=2)
    lora.prepare_retain(model, ORD[:3], None)
    with torch.no_grad():
        assert float(lora.retain_loss(model, torch.Generator().manual_seed(7))) == 0.0


def test_adversarial_finetune_lora_touches_only_its_adapters_targets(model):
    mit = make_mitigator("adversarial-finetune-lora", lora_rank=2, **TINY_ADV)
    mit.fit(model, MEM, ORD, surrogates=torch.rand(2, 3, 16, 16))
    changed = _changed(model.unet, mit.patched().unet)
    assert changed and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for k in changed), sorted(changed)
    assert mit.describe_fit()["mode"] == "lora-r2"
    narrow = make_mitigator("adversarial-finetune-lora", lora_rank=2, lora_targets=r".*attn2\.(to_k|to_v)", **TINY_ADV)
    narrow.fit(model, MEM, ORD, surrogates=torch.rand(2, 3, 16, 16))
    changed = _changed(model.unet, narrow.patched().unet)
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed), sorted(changed)


def test_bad_input(model):
    with pytest.raises(DiffmemError, match="fraction must be in \\(0, 1\\)"):
        make_mitigator("subspace-pruning", fraction=1.5)
    with pytest.raises(DiffmemError, match="holds no memorized prompts"):
        make_mitigator("subspace-pruning").fit(model, [], ORD)
    with pytest.raises(DiffmemError, match="no Linear layers matching 'nothing_here'"):
        make_mitigator("nemo", pattern="nothing_here").fit(model, MEM, ORD)
    with pytest.raises(DiffmemError, match="seeds must be >= 2"):
        make_mitigator("nemo", seeds=1).fit(model, MEM, ORD)


def test_cli_mitigate_refuses_to_overwrite_the_input(tiny_sd_folder, tmp_path, capsys):
    prompts = tmp_path / "mem.txt"
    prompts.write_text("\n".join(MEM), encoding="utf-8")
    ref = tmp_path / "ord.txt"
    ref.write_text("\n".join(ORD), encoding="utf-8")
    args = ["mitigate", "subspace-pruning", "--model", str(tiny_sd_folder), "--prompts", str(prompts),
            "--reference", str(ref), "--option", "timesteps=2"]
    assert main([*args, "--out", str(tiny_sd_folder)]) == 2
    assert "never overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "patched"), "--option", "fraction=0.05"]) == 0
    assert (tmp_path / "patched" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
