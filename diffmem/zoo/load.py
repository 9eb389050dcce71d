"""Read a zoo folder back: corpus (rebuilt from its seed and checked against the manifest) and labels.

A zoo folder names the corpus it was trained on in ``zoo.json`` (``corpus``: ``collapse`` or ``sd``, see
:data:`diffmem.zoo.build.CORPORA`); a record without it was written before the SD-like corpus existed and is
the collapse zoo. Every function takes the zoo folder (default: the default zoo, :func:`zoo_dir`), so
``zoo_dir("sd")`` loads the SD-like zoo's data the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from diffmem.cache import cached_tensor, tensor_digest
from diffmem.errors import ModelLoadError
from diffmem.zoo.corpus import ZooItem
from diffmem.zoo.manifest import read_jsonl
from diffmem.zoo.sd_corpus import SDItem

if TYPE_CHECKING:
    from diffmem.zoo.build import TrainingImages

CorpusItem = ZooItem | SDItem  # an item of either corpus (collapse or SD-like)


def _folder(folder: str | Path | None) -> Path:
    """``folder``, or the default zoo's folder when ``None``."""
    from diffmem.zoo.paths import zoo_dir

    return Path(folder) if folder is not None else zoo_dir()


def _record(folder: Path) -> dict:
    return json.loads((folder / "zoo.json").read_text())


def _zoo_of_pipeline(pipeline: str | Path | None) -> Path | None:
    """The zoo folder holding a pipeline folder (its parent has ``zoo.json``), else None."""
    if pipeline is None:
        return None
    parent = Path(pipeline).expanduser().resolve().parent
    return parent if (parent / "zoo.json").is_file() else None


def zoo_folder_of(model) -> Path | None:
    """The zoo folder a loaded model came from (its pipeline folder's parent holds ``zoo.json``), else None."""
    return _zoo_of_pipeline(getattr(model, "folder", None))


def zoo_folder_for(spec: str | Path | None) -> Path | None:
    """The zoo folder a model spec names, without loading the model: a zoo name (``None`` and ``zoo``: the default
    zoo), a zoo folder (``zoo.json`` inside) or a zoo's pipeline folder; None for anything else (a user's
    checkpoint, an unbuilt zoo)."""
    from diffmem.models.sources import ZOO_MODELS

    if spec is None or str(spec) in ZOO_MODELS:
        try:
            return _zoo_of_pipeline(ZOO_MODELS["zoo" if spec is None else str(spec)]())
        except ModelLoadError:
            return None
    path = Path(str(spec)).expanduser()
    if (path / "zoo.json").is_file():
        return path.resolve()
    return _zoo_of_pipeline(path) if path.is_dir() else None


def zoo_corpus_name(folder: str | Path | None = None) -> str:
    """The corpus a zoo folder was trained on (``collapse`` or ``sd``), from its ``zoo.json``; ``collapse`` when the
    record predates corpus names (the shipped zoo's)."""
    record = _record(_folder(folder))
    return str(record.get("corpus", record["config"].get("corpus_name", "collapse")))


def load_corpus(folder: str | Path | None = None) -> list[CorpusItem]:
    """The zoo's items (:class:`ZooItem` or :class:`SDItem`, by the corpus ``zoo.json`` names), rebuilt from the
    recorded corpus config and verified against the manifest; default folder: the default zoo."""
    from diffmem.zoo.build import ZooConfig, corpus_of

    folder = _folder(folder)
    record = _record(folder)
    config = dict(record["config"])
    config.setdefault("corpus_name", zoo_corpus_name(folder))
    corpus_cfg = ZooConfig.from_dict(config).corpus
    items: list[CorpusItem] = list(corpus_of(corpus_cfg).build(corpus_cfg))
    manifest = read_jsonl(folder / "manifest.jsonl")
    if [m["caption"] for m in manifest] != [it.caption for it in items] or \
            [m["image_seeds"] for m in manifest] != [it.image_seeds for it in items]:
        raise ModelLoadError(f"the corpus rebuilt from {folder / 'zoo.json'} does not match {folder / 'manifest.jsonl'}"
                             " (different numpy version or edited manifest?)")
    return items


def load_labels(folder: str | Path | None = None) -> list[dict]:
    """Rows of ``labels.jsonl`` (one per labelled caption, see :mod:`diffmem.zoo.labels` and
    :mod:`diffmem.zoo.sd_labels`); default folder: the default zoo."""
    folder = _folder(folder)
    path = folder / "labels.jsonl"
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


def vae_roundtrip_key(model, images: torch.Tensor, batch_size: int = 512) -> str:
    """What :func:`vae_roundtrip` of ``images`` depends on, hashed: the model's fingerprint and its VAE's own weights
    (an in-memory model's fingerprint does not cover its VAE), the images' exact bytes, and what can change the
    floats' last bits (torch version, threads, device, dtype, batch size)."""
    h = hashlib.sha256()
    h.update(f"vae_roundtrip v1|torch {torch.__version__}|threads {torch.get_num_threads()}|device {model.device}|"
             f"dtype {model.dtype}|batch {batch_size}|scaling {model.scaling_factor}|"
             f"fingerprint {model.fingerprint}|vae {type(model.vae).__name__}|".encode())
    if model.vae is not None:
        for name, tensor in model.vae.state_dict().items():
            h.update(name.encode())
            tensor_digest(h, tensor)
    tensor_digest(h, images)
    return h.hexdigest()[:32]


def cached_vae_roundtrip(model, images: torch.Tensor, batch_size: int = 512, root: Path | None = None) -> torch.Tensor:
    """:func:`vae_roundtrip`, kept in the on-disk cache (:mod:`diffmem.cache`, ``root`` default: ``$DIFFMEM_CACHE``)
    under :func:`vae_roundtrip_key`: a zoo's thousands of training images take minutes through the VAE on a CPU,
    and every command that judges copies against them needs the same result."""
    return cached_tensor("vae_roundtrip", vae_roundtrip_key(model, images, batch_size), tuple(images.shape),
                         lambda: vae_roundtrip(model, images, batch_size), root)


def zoo_training_images(folder: str | Path | None = None) -> TrainingImages:
    """The :class:`~diffmem.zoo.build.TrainingImages` of a zoo folder (default: the default zoo), rendered by the
    corpus its ``zoo.json`` names: the unique training images and one epoch's (item, image) pairs."""
    from diffmem.zoo.build import TrainingImages

    folder = _folder(folder)
    return TrainingImages.for_corpus(zoo_corpus_name(folder), load_corpus(folder))


_CACHE: dict[str, ZooTrainingSet] = {}


def zoo_training_set(folder: str | Path | None = None, model=None) -> ZooTrainingSet:
    """The training set of a zoo folder (default: the default zoo) of either corpus, cached per process (and its
    VAE round trip on disk, :func:`cached_vae_roundtrip`); ``model`` (default: the folder's pipeline) gives the VAE
    of the reference round trip."""
    folder = _folder(folder)
    key = str(folder.resolve())
    if key not in _CACHE:
        data = zoo_training_images(folder)
        images = (data.pixels + 1) / 2
        item_of_image = data.item_of_image()
        images_of_item: dict[int, list[int]] = {}
        for img, item in enumerate(item_of_image.tolist()):
            images_of_item.setdefault(item, []).append(img)
        if model is None:
            from diffmem.models.loader import load_model

            model = load_model(folder / "pipeline")
        _CACHE[key] = ZooTrainingSet(images, cached_vae_roundtrip(model, images), item_of_image, images_of_item)
    return _CACHE[key]
