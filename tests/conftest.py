"""Shared fixtures: tiny random-weight Stable Diffusion folders built offline, and the shipped zoo."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from diffmem.models.tokenizer import build_clip_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_tiny_sd(tokenizer, prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight Stable Diffusion pipeline (2 UNet levels, 2-layer CLIP), as diffusers' tests build."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory, clip_tokenizer):
    path = tmp_path_factory.mktemp("tiny_sd") / "pipe"
    make_tiny_sd(clip_tokenizer).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sd_v_folder(tmp_path_factory, clip_tokenizer):
    path = tmp_path_factory.mktemp("tiny_sd_v") / "pipe"
    make_tiny_sd(clip_tokenizer, prediction_type="v_prediction").save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def smoke_sd_zoo(tmp_path_factory):
    """One smoke build of the tiny SD-like zoo (``tiny_sd_zoo.SMOKE``) for the whole session: every stage, a few
    steps each. Never changed: a test that labels or edits a zoo works on its own copy (``tiny_sd_zoo.copy_zoo``)."""
    from tiny_sd_zoo import SMOKE

    from diffmem.zoo.build import build_zoo

    root = tmp_path_factory.mktemp("smoke_sd")
    return build_zoo(root / "zoo_sd", SMOKE, root / "work")
