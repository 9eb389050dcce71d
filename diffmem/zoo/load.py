"""Read a zoo folder back: corpus (rebuilt from its seed and checked against the manifest) and labels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.errors import ModelLoadError
from diffmem.zoo.corpus import CorpusConfig, ZooItem, build_corpus
from diffmem.zoo.manifest import read_jsonl


def load_corpus(folder: str | Path) -> list[ZooItem]:
    """The zoo's items with their renderer specs, rebuilt from ``zoo.json`` and verified against the manifest."""
    folder = Path(folder)
    record = json.loads((folder / "zoo.json").read_text())
    corpus_cfg = dict(record["config"]["corpus"])
    corpus_cfg["replication_rates"] = tuple(corpus_cfg["replication_rates"])
    items = build_corpus(CorpusConfig(**corpus_cfg))
    manifest = read_jsonl(folder / "manifest.jsonl")
    if [m["caption"] for m in manifest] != [it.caption for it in items] or \
            [m["image_seeds"] for m in manifest] != [it.image_seeds for it in items]:
        raise ModelLoadError(f"the corpus rebuilt from {folder / 'zoo.json'} does not match {folder / 'manifest.jsonl'}"
                             " (different numpy version or edited manifest?)")
    return items


def load_labels(folder: str | Path) -> list[dict]:
    """Rows of ``labels.jsonl`` (one per caption, see :mod:`diffmem.zoo.labels`)."""
    path = Path(folder) / "labels.jsonl"
    if not path.is_file():
        raise ModelLoadError(f"zoo folder '{folder}' has no labels.jsonl; run `diffmem zoo label --zoo {folder}`")
    return read_jsonl(path)


@dataclass
class ZooTrainingSet:
    """The zoo's unique training images, raw and as the zoo's own VAE reproduces them.

    Memorization is judged against ``reference`` (encode + decode through the zoo's VAE): a generation
    can at best reproduce a training image as well as the decoder represents it, so comparing with the
    raw render would cap the similarity of a perfect copy at the VAE's reconstruction quality (SSIM
    about 0.55 on the textured signature images) instead of 1. For Stable Diffusion, whose VAE is near
    lossless at this scale, the two coincide.
    """

    images: torch.Tensor  # (M, 3, 32, 32) in [0, 1]
    reference: torch.Tensor  # same, through the zoo's VAE
    item_of_image: np.ndarray  # (M,)
    images_of_item: dict[int, list[int]]


@torch.no_grad()
def vae_roundtrip(model, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images in [0, 1] through ``model``'s VAE (encode to the posterior mean, decode)."""
    return torch.cat([model.decode(model.encode_images(images[i : i + batch_size])).cpu()
                      for i in range(0, len(images), batch_size)])


_CACHE: dict[str, ZooTrainingSet] = {}


def zoo_training_set(folder: str | Path | None = None, model=None) -> ZooTrainingSet:
    """The training set of a zoo folder (default: the embedded zoo), cached per process."""
    from diffmem.zoo.build import TrainingImages
    from diffmem.zoo.paths import zoo_dir

    folder = Path(folder) if folder is not None else zoo_dir()
    key = str(folder.resolve())
    if key not in _CACHE:
        data = TrainingImages(load_corpus(folder))
        images = (data.pixels + 1) / 2
        item_of_image = np.zeros(len(images), dtype=np.int64)
        item_of_image[data.image_of_pair] = data.item_of_pair
        images_of_item: dict[int, list[int]] = {}
        for img, item in enumerate(item_of_image.tolist()):
            images_of_item.setdefault(item, []).append(img)
        if model is None:
            from diffmem.models.loader import load_model

            model = load_model(folder / "pipeline")
        _CACHE[key] = ZooTrainingSet(images, vae_roundtrip(model, images), item_of_image, images_of_item)
    return _CACHE[key]
