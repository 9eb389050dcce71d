"""Ground truth by extraction for the SD-like zoo (docs/zoo-sd.md, training plan step 5).

The rule is the collapse zoo's (:mod:`diffmem.zoo.labels`, reused through a :class:`LabelScheme`): ``k``
generations per caption (DDIM, CFG), each matched to its nearest training image (pixel L2 shortlist, then
SSIM, training images through the zoo's VAE), the caption *memorized* when the best SSIM exceeds a per-family
threshold from a null of what an ideal generaliser would produce. What differs is the null and the families:

- an ordinary caption (family ``ordinary``: ``generic``, ``heldout_generic``) names a few factors and leaves
  the rest to chance, so its null is fresh renders with its :class:`~diffmem.zoo.sd_corpus.Named` factors,
  ``sample_scene(named, new_seed)``: another image the caption describes equally well;
- a title (families ``painting`` and ``poster``: titles, signatures, templates and their look-alikes) names
  only its family's style, so its null is a fresh image of its family, ``sample_scene(Named(style=family),
  new_seed)``: what a model that learned the family but not the title would draw.

Both are one call, ``sample_scene(item.named, seed)``, because a title item's ``named`` is its family's style.

Which captions: every caption except the 16,000 once-seen titles, of which a fixed random
``SDLabelConfig.titles`` (1,000): all of them at 4 seeds would take about 80 minutes, and 1,000 measure the
once-seen rate to about 1.5 points. Fidelity (every factor an ordinary caption names read back by the SD
attribute reader, :func:`~diffmem.zoo.sd_attributes.shows_named`) is recorded per ordinary caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.models.model import DiffusionModel
from diffmem.zoo.attributes import AttributeReader
from diffmem.zoo.labels import GENERIC_KINDS, LabelConfig, LabelScheme, label_zoo
from diffmem.zoo.load import ZooTrainingSet
from diffmem.zoo.sd_attributes import shows_named
from diffmem.zoo.sd_corpus import FAMILIES, SDItem, render_scene, sample_scene

SD_FAMILIES: tuple[str, ...] = ("ordinary", *FAMILIES)


@dataclass(frozen=True)
class SDLabelConfig(LabelConfig):
    """:class:`LabelConfig` plus which once-seen titles are labelled: a fixed random ``titles`` of them,
    drawn with ``title_seed`` (saved with the labels)."""

    titles: int = 1000
    title_seed: int = 0


def fresh_sd_image(item: SDItem, rng: np.random.Generator) -> np.ndarray:
    """An independent image the caption describes as well as its training images: a new scene with the
    caption's named factors (a title's: its family's style), every other factor drawn afresh."""
    return render_scene(sample_scene(item.named, int(rng.integers(2**31))))


def sd_fidelity(reader: AttributeReader, gen: torch.Tensor, items: list[SDItem], k: int) -> np.ndarray:
    """Per generation: 1.0 when every factor its ordinary caption names is read back, else 0.0; NaN for titles
    (they name no factor the reader reads but the style)."""
    out = np.full(len(gen), np.nan)
    rows = [i for i, it in enumerate(items) if it.kind in GENERIC_KINDS]
    if rows:
        idx = [i * k + j for i in rows for j in range(k)]
        named = [items[i].named for i in rows for _ in range(k)]
        out[idx] = shows_named(reader, gen[idx], named).astype(np.float64)
    return out


SD_SCHEME = LabelScheme(SD_FAMILIES, lambda it: it.family, fresh_sd_image, sd_fidelity)


def select_sd_captions(items: list[SDItem], titles: int = 1000, seed: int = 0) -> list[SDItem]:
    """The captions to label: every caption except once-seen titles, of which a fixed random ``titles``
    (drawn with ``seed``), in corpus order."""
    once_seen = [it.item_id for it in items if it.kind == "title"]
    rng = np.random.default_rng(seed)
    keep = {once_seen[i] for i in rng.permutation(len(once_seen))[:titles]}
    return [it for it in items if it.kind != "title" or it.item_id in keep]


def summarise_by_family(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Memorized fraction per family and kind (``{family: {kind: {n, memorized}}}``): the title families
    apart, so a family whose look-alikes regurgitate shows."""
    out: dict[str, dict[str, dict]] = {}
    for fam in sorted({r["family"] for r in rows}):
        for kind in sorted({r["kind"] for r in rows if r["family"] == fam}):
            sel = [r["memorized"] for r in rows if r["family"] == fam and r["kind"] == kind]
            out.setdefault(fam, {})[kind] = {"n": len(sel), "memorized": round(float(np.mean(sel)), 4)}
    return out


def label_sd_zoo(model: DiffusionModel, items: list[SDItem], reader: AttributeReader | None,
                 training_set: ZooTrainingSet, cfg: SDLabelConfig = SDLabelConfig(), progress: bool = True,
                 cache_dir: str | Path | None = None, selection: list[SDItem] | None = None,
                 ) -> tuple[list[dict], dict]:
    """Label the SD-like zoo: ``selection`` (default :func:`select_sd_captions`) by generation, thresholds per
    family from a null drawn over *all* of ``items``; returns (rows, summary) as :func:`label_zoo` does, the
    summary also per family and with the title selection."""
    chosen = select_sd_captions(items, cfg.titles, cfg.title_seed) if selection is None else selection
    rows, summary = label_zoo(model, chosen, reader, cfg, progress, training_set, cache_dir, SD_SCHEME,
                              null_items=items)
    summary["by_family"] = summarise_by_family(rows)
    summary["selection"] = {"labelled": len(chosen), "captions": len(items),
                            "titles": sum(it.kind == "title" for it in chosen),
                            "once_seen_titles": sum(it.kind == "title" for it in items)}
    summary["fidelity_reads"] = "every named factor"
    return rows, summary

