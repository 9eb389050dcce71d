"""Quality metrics a mitigation must report: FID, prompt fidelity, diversity across seeds.

- **FID** (Heusel et al. 2017) through torchmetrics' ``FrechetInceptionDistance`` with a custom
  feature extractor: Inception weights cannot be downloaded here, so a task supplies its features
  (the zoo: its attribute reader's 256-d penultimate layer, :class:`ReaderFeatures`, the role Inception
  plays for ImageNet). ``feature="inception"`` keeps torchmetrics' own path for users whose
  torch-fidelity Inception weights are available locally.
- **Prompt fidelity** is the task's (:meth:`diffmem.tasks.base.BenchTask.fidelity`; the zoo reads the
  attributes each caption names). For a real model: ``open_clip_score`` (open_clip with a local weights
  file) or ``clip_score`` (torchmetrics' CLIPScore with a local transformers CLIP folder).
- **Diversity**: mean pairwise ``1 - SSIM`` among one prompt's generations, averaged over prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffmem.eval.similarity import pairwise_ssim, resize_images


class ReaderFeatures(nn.Module):
    """The attribute reader's penultimate features as an FID feature extractor (images in [0, 1])."""

    def __init__(self, reader, image_size: int = 32):
        super().__init__()
        self.features = reader.features
        self.image_size = image_size
        self.num_features = self.features[-2].out_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = resize_images(x, self.image_size)
        return self.features(x * 2 - 1).double()


def fid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module | str,
        batch_size: int = 512) -> float:
    """FID between two image sets in [0, 1] with ``feature`` (a module, or ``"inception"``)."""
    if feature == "inception":
        feature = 2048
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    for x, real_flag in ((real, True), (fake, False)):
        for i in range(0, len(x), batch_size):
            metric.update(x[i : i + batch_size].float(), real=real_flag)
    return float(metric.compute())


def diversity(images: torch.Tensor, per_prompt: int) -> float:
    """Mean pairwise ``1 - SSIM`` within each prompt's ``per_prompt`` consecutive images."""
    if per_prompt < 2:
        raise ValueError("diversity needs at least 2 images per prompt")
    n = len(images) // per_prompt
    return float(1 - pairwise_ssim(images[: n * per_prompt], per_prompt).mean())


def clip_score(images: torch.Tensor, prompts: list[str], clip_path: str | Path) -> float:
    """torchmetrics CLIPScore with a local CLIP folder (no download)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(clip_path))
    metric.update((images * 255).round().to(torch.uint8), prompts)
    return float(metric.compute())


def open_clip_score(images: torch.Tensor, prompts: list[str], weights: str | Path, arch: str = "ViT-B-32",
                    batch_size: int = 64) -> float:
    """CLIPScore (Hessel et al. 2021), ``100 * max(cos(image, text), 0)`` averaged, through open_clip with a
    local weights file (no download)."""
    import open_clip

    if not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip weights '{weights}' not found")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(arch)
    size = preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    mean = torch.tensor(preprocess.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1)
    scores = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = resize_images(images[i : i + batch_size], size, mode="bicubic")
            img = F.normalize(model.encode_image((x.clamp(0, 1) - mean) / std), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(prompts[i : i + batch_size])), dim=-1)
            scores.append(100 * (img * txt).sum(-1).clamp_min(0))
    return float(torch.cat(scores).mean())


HELDOUT_TIMESTEPS: tuple[int, ...] = (100, 300, 500, 700, 900)
"""Default timesteps of :func:`heldout_denoising_loss`: spread over a 1000-step training schedule so the
term weighs coarse layout (large t) and detail (small t) alike."""


@torch.no_grad()
def heldout_denoising_loss(model, images: torch.Tensor, captions: list[str],
                           timesteps: tuple[int, ...] = HELDOUT_TIMESTEPS, noise_seed: int = 0,
                           batch_size: int = 256) -> torch.Tensor:
    """Per-image denoising loss on held-out images: how well ``model`` has learnt a domain.

    The diffusion training objective (Ho et al. 2020's ``L_simple``) evaluated, not optimised, on images
    the model was not fine-tuned on, with their captions::

        L(x0, c) = 1/|T| sum_{t in T} || eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps_t, t, c) - eps_t ||^2 / d

    with ``z0`` the VAE posterior mean of ``x0`` (times the scaling factor), ``a_t`` the cumulative alpha
    of the model's training schedule and ``d`` the latent size. ``T`` and every ``eps_t`` are fixed (drawn
    from ``noise_seed`` on the CPU, per image and timestep), so two checkpoints that share the VAE are
    compared on identical noisy inputs and the difference is the UNet's alone. Lower = the domain is
    better learnt; unlike an attribute reader or FID features it needs nothing but the checkpoint, so it
    works on any Stable Diffusion model.

    ``images``: ``(N, 3, H, W)`` in [0, 1]; ``captions``: one per image. Returns ``(N,)`` losses (mean
    over ``timesteps``).
    """
    if len(images) != len(captions):
        raise ValueError(f"heldout_denoising_loss needs one caption per image, got {len(images)} images and "
                         f"{len(captions)} captions")
    if not timesteps:
        raise ValueError("heldout_denoising_loss needs at least one timestep")
    n_train = len(model.alphas_cumprod)
    if min(timesteps) < 0 or max(timesteps) >= n_train:
        raise ValueError(f"timesteps must lie in [0, {n_train - 1}], got {timesteps}")
    latents = torch.cat([model.encode_images(images[i : i + batch_size]).cpu().float()
                         for i in range(0, len(images), batch_size)])
    emb = model.encode_prompts(captions)
    k = len(timesteps)
    g = torch.Generator().manual_seed(int(noise_seed))
    noise = torch.randn((len(latents), k, *latents.shape[1:]), generator=g)
    t = torch.as_tensor(timesteps, dtype=torch.long).repeat(len(latents))
    a = model.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    z0 = latents.repeat_interleave(k, 0)
    eps = noise.reshape(-1, *latents.shape[1:])
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    cond = emb.repeat_interleave(k, 0)
    losses = []
    for i in range(0, len(zt), batch_size):
        pred = model.predict_noise(zt[i : i + batch_size].to(model.device), t[i : i + batch_size].to(model.device),
                                   cond[i : i + batch_size])
        losses.append((pred.float().cpu() - eps[i : i + batch_size]).pow(2).flatten(1).mean(1))
    return torch.cat(losses).view(len(latents), k).mean(1)


def relative_improvement(base: float, value: float) -> float:
    """``(base - value) / base``: the share of the base model's loss that fine-tuning removed."""
    if base <= 0:
        raise ValueError(f"relative_improvement needs a positive base loss, got {base}")
    return (base - value) / base
