"""The zoo model's components: genuine diffusers / transformers modules, sized for a 2-core CPU.

A latent pipeline (tiny ``AutoencoderKL`` 32x32x3 -> 8x8x4, ``UNet2DConditionModel`` on the latents,
2-layer ``CLIPTextModel``) makes the zoo a plain ``StableDiffusionPipeline``: every code path that
reads the zoo (VAE decoding, latent scaling, CFG, the scheduler) is the one that reads Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffmem.models.tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes of the zoo's networks (saved in the zoo's build config)."""

    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def make_text_encoder(cfg: ArchitectureConfig) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_tokens,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def make_vae(cfg: ArchitectureConfig, image_size: int = 32) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=image_size,
    )


def make_unet(cfg: ArchitectureConfig, latent_size: int = 8) -> UNet2DConditionModel:
    # diffusers' `attention_head_dim` on this class is the number of heads (a documented naming quirk)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=32,
    )


def make_scheduler() -> DDIMScheduler:
    """Stable Diffusion v1's noise schedule (scaled-linear betas, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
