"""The model layer on tiny random Stable Diffusion folders (epsilon and v-prediction)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffmem.models import DiffusionModel, load_model

PROMPTS = ["a red circle in the top left on a gray background", "a photo of a cat"]


def test_loads_folder_and_reports_provenance(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    assert isinstance(model, DiffusionModel)
    assert model.latent_shape == (4, 8, 8)
    info = model.describe()
    assert info["prediction_type"] == "epsilon" and info["dtype"] == "float32"
    assert len(info["fingerprint"]) == 16
    assert load_model(tiny_sd_folder).fingerprint == model.fingerprint


def test_encode_prompts_batches_and_empty_prompt(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    emb = model.encode_prompts(PROMPTS, batch_size=1)
    assert emb.shape == (2, 77, 32)
    torch.testing.assert_close(emb, model.encode_prompts(PROMPTS))
    torch.testing.assert_close(model.empty_embedding(), model.encode_prompts([""]))


def test_guided_pair_is_one_batched_call_equal_to_separate_calls(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    x = model.initial_latents([0, 1])
    emb = model.encode_prompts(PROMPTS)
    calls = []
    handle = model.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    eps_u, eps_c = model.guided_pair(x, 981, emb)
    handle.remove()
    assert calls == [4]  # both branches, both prompts: one UNet call
    torch.testing.assert_close(eps_c, model.predict_noise(x, 981, emb), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_u, model.predict_noise(x, 981, model.empty_embedding()), rtol=1e-4, atol=1e-5)


def test_v_prediction_is_converted_to_epsilon(tiny_sd_v_folder):
    model = load_model(tiny_sd_v_folder)
    assert model.prediction_type == "v_prediction"
    x = model.initial_latents([3])
    t = torch.tensor([500])
    emb = model.encode_prompts(PROMPTS[:1])
    v = model.unet(x, t, encoder_hidden_states=emb).sample
    a = model.alphas_cumprod[500].item()
    expected = a**0.5 * v + (1 - a) ** 0.5 * x  # eps = sqrt(a) v + sqrt(1 - a) x_t
    torch.testing.assert_close(model.predict_noise(x, t, emb), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_sd_folder", "tiny_sd_v_folder"])
def test_sampler_matches_diffusers_pipeline(fixture, request):
    """Our CFG + DDIM loop reproduces StableDiffusionPipeline's output for the same initial latents."""
    folder = request.getfixturevalue(fixture)
    model = load_model(folder)
    out = model.sample(PROMPTS, seeds=[7, 8], num_inference_steps=4, guidance_scale=5.0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, latents=model.initial_latents([7, 8]), num_inference_steps=4, guidance_scale=5.0,
               output_type="pt").images
    assert out.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out.images, ref.float(), rtol=1e-3, atol=2e-3)


def test_sampling_is_deterministic_given_seeds(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    a = model.sample(PROMPTS, seeds=[1, 2], num_inference_steps=2, batch_size=1).images
    b = model.sample(PROMPTS, seeds=[1, 2], num_inference_steps=2).images
    c = model.sample(PROMPTS, seeds=[1, 3], num_inference_steps=2).images
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[1], c[1])


def test_pipeline_object_and_folder_load_through_the_same_call(tiny_sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, local_files_only=True, safety_checker=None)
    from_object = load_model(pipe)
    from_folder = load_model(tiny_sd_folder)
    x = from_folder.initial_latents([0])
    emb = from_folder.encode_prompts(PROMPTS[:1])
    torch.testing.assert_close(from_object.predict_noise(x, 10, emb), from_folder.predict_noise(x, 10, emb))


def test_images_round_trip_through_the_vae(tiny_sd_folder):
    """encode_images = the VAE posterior mean of 2x - 1, scaled; decode = (VAE decode of latents / scale + 1) / 2."""
    model = load_model(tiny_sd_folder)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = model.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    sf = model.vae.config.scaling_factor
    with torch.no_grad():
        expected = model.vae.encode(images * 2 - 1).latent_dist.mean * sf
        decoded = ((model.vae.decode(expected / sf).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(model.decode(latents), decoded)
    assert float(model.decode(latents).min()) >= 0 and float(model.decode(latents).max()) <= 1


def test_encode_prompts_is_the_text_encoder_on_padded_ids(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    ids = model.tokenize(PROMPTS)
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and (ids[1, 6:] == 49407).all()  # start token; "a photo of a cat" then end-padded
    with torch.no_grad():
        expected = model.text_encoder(ids)[0]
    torch.testing.assert_close(model.encode_prompts(PROMPTS), expected)


def test_tokenizer_longer_than_the_text_encoder_is_clamped_at_load(clip_tokenizer, caplog):
    """A tokenizer with model_max_length 100 on a 77-position text encoder: one warning naming both numbers at
    load time, and prompts (long ones too) encode at 77 tokens instead of raising in the first scan."""
    import copy
    import logging

    from conftest import make_tiny_sd

    pipe = make_tiny_sd(clip_tokenizer)
    pipe.tokenizer = copy.deepcopy(clip_tokenizer)
    pipe.tokenizer.model_max_length = 100
    with caplog.at_level(logging.WARNING, logger="diffmem.models.model"):
        model = load_model(pipe)
    lines = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(lines) == 1 and "100" in lines[0] and "77" in lines[0]
    assert model.max_tokens == 77 and model.describe()["max_tokens"] == 77
    long_prompt = " ".join(["a red circle"] * 40)
    assert model.encode_prompts([long_prompt, PROMPTS[0]]).shape == (2, 77, 32)
