"""The SD-like zoo's attribute reader and its prompt-fidelity metric.

The collapse zoo's reader (:mod:`diffmem.zoo.attributes`) was trained on flat single-object images and
cannot read SD-like scenes (docs/zoo-sd.md: shape read back in 0.274 of ordinary training images). This
reader has the same network with one head per factor a caption of the SD-like corpus can name about its
image: the main object's shape, colour, position and size, and the image's style. It is trained the same
way (:func:`~diffmem.zoo.attributes.fit_reader`): on fresh :func:`~diffmem.zoo.sd_corpus.sample_scene`
renders with every factor drawn at random (backgrounds, textures, bands and small objects as in the
corpus), half of each batch through the zoo's VAE, so it reads at the decoder's sharpness and never sees
a generation.

Fidelity (:func:`shows_named`): a generated image is faithful to its caption when the reader reads back
*every* factor the caption's :class:`~diffmem.zoo.sd_corpus.Named` names; unnamed factors are free (that
is what an under-specified caption means). The after-training gates and the mitigation bench use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from diffmem.zoo.attributes import AttributeReader, fit_reader
from diffmem.zoo.corpus import COLORS, POSITIONS, SHAPES
from diffmem.zoo.sd_corpus import SD_SIZES, STYLES, Named, Scene, render_scene, sample_scene

SD_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "position": tuple(POSITIONS),
    "size": tuple(SD_SIZES),
    "style": STYLES,
}
NAMED_FACTORS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Named))
assert set(NAMED_FACTORS) == set(SD_ATTRIBUTES), "every factor a caption can name needs a reader head"


class SDAttributeReader(AttributeReader):
    """:class:`~diffmem.zoo.attributes.AttributeReader` with the SD-like corpus's heads (``SD_ATTRIBUTES``)."""

    default_attributes = SD_ATTRIBUTES


def scene_truth(scene: Scene) -> dict[str, str]:
    """What a reader should read from a render of ``scene``: the main object's factors and the style."""
    main = scene.main
    return {"shape": main.shape, "color": main.color, "position": main.position, "size": main.size,
            "style": scene.style}


def random_scene_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh renders of scenes with every factor drawn at random, with their value indices per head."""
    scenes = [sample_scene(Named(), int(rng.integers(2**31))) for _ in range(n)]
    images = np.stack([render_scene(s) for s in scenes])
    truth = [scene_truth(s) for s in scenes]
    idx = {name: torch.tensor([values.index(t[name]) for t in truth]) for name, values in SD_ATTRIBUTES.items()}
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, idx


def train_sd_attribute_reader(seed: int, steps: int, batch: int, vae=None,
                              schedule: str = "constant") -> SDAttributeReader:
    """Train the SD-like corpus's reader on fresh scene renders, half of each batch through ``vae``."""
    return cast(SDAttributeReader, fit_reader(SDAttributeReader, random_scene_batch, seed, steps, batch, vae,
                                              desc="zoo sd: attribute reader", schedule=schedule))


def named_values(named: Named) -> dict[str, str]:
    """The factors ``named`` fixes, as ``{factor: value}`` (unnamed factors left out)."""
    return {k: v for k, v in dataclasses.asdict(named).items() if v is not None}


def _per_image(named: Named | Sequence[Named], n: int) -> list[Named]:
    if isinstance(named, Named):
        return [named] * n
    named = list(named)
    if len(named) != n:
        raise ValueError(f"{len(named)} Named for {n} images; expected one per image or a single one")
    return named


def factor_hits(reads: dict[str, list[str]], named: Named | Sequence[Named]) -> dict[str, np.ndarray]:
    """Per factor, per image: 1.0 if the read value equals the named one, 0.0 if not, NaN if not named.

    ``reads`` is :meth:`AttributeReader.read`'s output; ``named`` one :class:`Named` for all images or one each.
    """
    n = len(next(iter(reads.values())))
    per = _per_image(named, n)
    hits = {f: np.full(n, np.nan) for f in NAMED_FACTORS}
    for i, nm in enumerate(per):
        for factor, value in named_values(nm).items():
            hits[factor][i] = float(reads[factor][i] == value)
    return hits


def factors_shown(reads: dict[str, list[str]], named: Named | Sequence[Named]) -> np.ndarray:
    """Per image: True when every factor its caption names is read back (a caption naming none: True)."""
    hits = np.stack(list(factor_hits(reads, named).values()))  # (factors, N), NaN = not named
    return np.all(np.isnan(hits) | (hits == 1.0), axis=0)


def shows_named(reader: AttributeReader, images: torch.Tensor, named: Named | Sequence[Named]) -> np.ndarray:
    """Per image (``(N, 3, 32, 32)`` in [0, 1]): does it show every factor its caption's ``named`` names?"""
    return factors_shown(reader.read(images), named)


def fidelity_by_value(reader: AttributeReader, images: torch.Tensor, named: Named | Sequence[Named]
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Per factor and named value: how many images name it (``n``) and the share read back (``read_back``);
    where a factor's read-back falls short, this says which value is drawn wrong (e.g. small objects)."""
    reads = reader.read(images)
    per = _per_image(named, len(images))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for factor, hit in factor_hits(reads, per).items():
        values = np.array([named_values(nm).get(factor, "") for nm in per])
        for value in sorted(set(values) - {""}):
            sel = values == value
            out.setdefault(factor, {})[str(value)] = {"n": int(sel.sum()), "read_back": float(hit[sel].mean())}
    return out


def fidelity(reader: AttributeReader, images: torch.Tensor, named: Named | Sequence[Named]) -> dict[str, float]:
    """``all``: share of images showing every named factor; per factor: share read back among images whose
    caption names it (absent when none does). The issue's after-training gate asks ``>= 0.85`` of each."""
    reads = reader.read(images)
    out = {"all": float(factors_shown(reads, named).mean())}
    for factor, hit in factor_hits(reads, named).items():
        if not np.isnan(hit).all():
            out[factor] = float(np.nanmean(hit))
    return out
