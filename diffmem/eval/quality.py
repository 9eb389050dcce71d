"""Quality metrics a mitigation must report: FID, prompt fidelity, diversity across seeds.

- **FID** (Heusel et al. 2017) through torchmetrics' ``FrechetInceptionDistance`` with a custom
  feature extractor: Inception weights cannot be downloaded here, so the zoo's features are the
  attribute reader's 256-d penultimate layer (a classifier trained on the corpus, the role Inception
  plays for ImageNet). ``feature="inception"`` keeps torchmetrics' own path for users whose
  torch-fidelity Inception weights are available locally.
- **Prompt fidelity** on the zoo: share of generations whose shape, colour and position the
  attribute reader reads back (the zoo's CLIP score). ``clip_score`` wraps torchmetrics' CLIPScore
  for users with a local CLIP folder.
- **Diversity**: mean pairwise ``1 - SSIM`` among one prompt's generations, averaged over prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from diffmem.eval.similarity import ssim_pairs


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
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.features(x * 2 - 1).double()


def zoo_feature_extractor() -> ReaderFeatures:
    from diffmem.zoo.attributes import AttributeReader
    from diffmem.zoo.paths import zoo_dir

    return ReaderFeatures(AttributeReader.load(zoo_dir() / "attribute_reader"))


def fid(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module | str | None = None,
        batch_size: int = 512) -> float:
    """FID between two image sets in [0, 1]; ``feature`` defaults to the zoo's reader features."""
    if feature is None:
        feature = zoo_feature_extractor()
    elif feature == "inception":
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
    x = images[: n * per_prompt].view(n, per_prompt, *images.shape[1:])
    i, j = torch.triu_indices(per_prompt, per_prompt, offset=1)
    a = x[:, i].reshape(-1, *images.shape[1:])
    b = x[:, j].reshape(-1, *images.shape[1:])
    return float((1 - ssim_pairs(a, b)).mean())


def clip_score(images: torch.Tensor, prompts: list[str], clip_path: str | Path) -> float:
    """torchmetrics CLIPScore with a local CLIP folder (no download)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(clip_path))
    metric.update((images * 255).round().to(torch.uint8), prompts)
    return float(metric.compute())


def zoo_fidelity(images: torch.Tensor, captions: list[str]) -> float:
    """Share of generations whose shape, colour and position the zoo's attribute reader reads back.

    ``captions`` must be single-object zoo captions (one per image).
    """
    from diffmem.zoo.attributes import AttributeReader, attribute_accuracy
    from diffmem.zoo.corpus import parse_generic_caption
    from diffmem.zoo.paths import zoo_dir

    reader = AttributeReader.load(zoo_dir() / "attribute_reader")
    parsed = [parse_generic_caption(c) for c in captions]
    return float(attribute_accuracy(reader, images, [p[0] for p in parsed], [p[1] for p in parsed])["all"].mean())
