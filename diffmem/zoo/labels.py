"""Ground truth by extraction: which zoo captions make the model reproduce a training image.

For every caption we generate ``k`` images (DDIM, CFG) and find each one's nearest training image
(pixel L2 shortlist, then SSIM), training images taken through the zoo's VAE (see
:class:`~diffmem.zoo.load.ZooTrainingSet` for why). A caption is *memorized* when its best SSIM exceeds a threshold that
an ideal generaliser would exceed only ``1 - null_quantile`` of the time: the same statistic computed
on ``k`` independent renders of the caption (fresh jitter, fresh texture) against its training images.
The match is ``own`` when the nearest image is the caption's own training image (matching verbatim)
and ``other`` when it is another caption's (template-like). Pixel L2 to the two nearest neighbours is
recorded too (Gu et al. 2025's ratio d1/d2).

The rule is corpus-agnostic: a :class:`LabelScheme` supplies what differs between corpora (caption families,
how to render a caption afresh for the null, how to read its attributes back); :data:`COLLAPSE_SCHEME` is the
shipped zoo's, :mod:`diffmem.zoo.sd_labels` the SD-like zoo's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.eval.matching import SSIMMatcher
from diffmem.eval.similarity import SSIM_PARAMS, l2_nearest, ssim_pairs
from diffmem.io import atomic_torch_save
from diffmem.models.model import DiffusionModel
from diffmem.zoo.attributes import attribute_accuracy
from diffmem.zoo.corpus import ZooItem, render
from diffmem.zoo.load import ZooTrainingSet, vae_roundtrip, zoo_training_set

GENERIC_KINDS = ("generic", "heldout_generic")


@dataclass(frozen=True)
class LabelConfig:
    """How the ground truth is extracted; saved with the labels."""

    seeds_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    null_quantile: float = 0.99
    candidates: int = 8
    seed_offset: int = 0
    batch_size: int = 256
    null_captions: int = 300
    null_seed: int = 12345


def family(kind: str) -> str:
    return "object" if kind in GENERIC_KINDS else "scene"


def _to_unit(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


Roundtrip = Callable[[torch.Tensor], torch.Tensor]


def _fresh_collapse_image(item: ZooItem, rng: np.random.Generator) -> np.ndarray:
    """An independent render of a collapse caption: fresh jitter, and its own texture when it has one."""
    spec = item.spec
    if spec.texture_seed is not None:  # an independent image of this caption has its own texture
        spec = dataclasses.replace(spec, texture_seed=int(rng.integers(2**31)))
    return render(spec, int(rng.integers(2**31)))


def _collapse_fidelity(reader: Any, gen: torch.Tensor, items: list, k: int) -> np.ndarray:
    """Per generation: shape, colour and position of a generic caption read back (NaN for other kinds)."""
    fidelity = np.full(len(gen), np.nan)
    generic_rows = [i for i, it in enumerate(items) if it.kind in GENERIC_KINDS]
    if generic_rows:
        sample_idx = [i * k + j for i in generic_rows for j in range(k)]
        objs = [items[i].spec.objects[0] for i in generic_rows for _ in range(k)]
        bgs = [items[i].spec.background for i in generic_rows for _ in range(k)]
        fidelity[sample_idx] = attribute_accuracy(reader, gen[sample_idx], objs, bgs)["all"]
    return fidelity


@dataclass(frozen=True)
class LabelScheme:
    """What labelling needs to know about a corpus, so one labeller serves both (collapse here, the SD-like
    corpus in :mod:`diffmem.zoo.sd_labels`).

    ``families`` are the caption families that get their own threshold (in the order the null draws them,
    which fixes its random numbers), ``family_of(item)`` names an item's; ``fresh_image(item, rng)`` renders
    what an ideal generaliser would produce for the caption (``(32, 32, 3)`` uint8); ``fidelity(reader,
    generations, items, k)`` gives per generation the share of the caption's attributes read back (NaN where
    not measured).
    """

    families: tuple[str, ...]
    family_of: Callable[[Any], str]
    fresh_image: Callable[[Any, np.random.Generator], np.ndarray]
    fidelity: Callable[[Any, torch.Tensor, list, int], np.ndarray]


COLLAPSE_SCHEME = LabelScheme(("object", "scene"), lambda it: family(it.kind), _fresh_collapse_image,
                              _collapse_fidelity)


def null_thresholds(items: list, matcher: SSIMMatcher, cfg: LabelConfig, roundtrip: Roundtrip,
                    scheme: LabelScheme = COLLAPSE_SCHEME) -> dict[str, dict]:
    """Per caption family: the ``null_quantile`` of the labelling statistic computed on what an ideal
    generaliser would produce: ``k`` independent renders of a caption (``scheme.fresh_image``: for the collapse
    corpus fresh jitter and texture), through the VAE like any generation, each matched against the *whole*
    training set exactly as generations are, best of ``k``; up to ``cfg.null_captions`` trained captions
    per family."""
    rng = np.random.default_rng(cfg.null_seed)
    out: dict[str, dict] = {}
    k = cfg.seeds_per_prompt
    for fam in scheme.families:
        pool = [it for it in items if it.trained and scheme.family_of(it) == fam]
        if not pool:
            continue
        chosen = [pool[i] for i in rng.permutation(len(pool))[: cfg.null_captions]]
        fresh = [scheme.fresh_image(item, rng) for item in chosen for _ in range(k)]
        sims = matcher.match(roundtrip(_to_unit(fresh))).similarity.view(len(chosen), k).amax(1).numpy()
        out[fam] = {"threshold": float(np.quantile(sims, cfg.null_quantile)), "n": len(sims),
                    "median": float(np.median(sims)), "max": float(sims.max())}
    return out


def generate(model: DiffusionModel, items: list, cfg: LabelConfig, progress: bool = True,
             cache_dir: str | Path | None = None) -> torch.Tensor:
    """``cfg.seeds_per_prompt`` generations of every item's caption (seed ``seed_offset + item_id * k + j``),
    as 8-bit images in [0, 1], caption after caption; cached in ``cache_dir`` by model, config and captions."""
    k = cfg.seeds_per_prompt
    captions = [it.caption for it in items]
    prompts = [c for c in captions for _ in range(k)]
    seeds = [cfg.seed_offset + it.item_id * k + j for it in items for j in range(k)]
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([model.fingerprint, dataclasses.asdict(cfg), captions]).encode()).hexdigest()
        cache_file = Path(cache_dir) / f"generations-{key[:16]}.pt"
    if cache_file is not None and cache_file.is_file():
        return torch.load(cache_file, weights_only=True).float() / 255
    gen = model.sample(prompts, seeds, num_inference_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size, progress=progress).images
    gen = (gen * 255).round() / 255  # stored as 8-bit images, like any generated image file
    if cache_file is not None:
        atomic_torch_save((gen * 255).round().to(torch.uint8), cache_file)
    return gen


def label_generations(gen: torch.Tensor, items: list, ts: ZooTrainingSet, matcher: SSIMMatcher,
                      thresholds: dict[str, dict], k: int, reader: Any = None,
                      scheme: LabelScheme = COLLAPSE_SCHEME) -> list[dict]:
    """The labelling rule on given generations (``k`` per item, item after item; ``matcher`` fitted on
    ``ts.reference``): a caption is memorized when its best match's SSIM exceeds its family's threshold."""
    train, item_of_image = ts.reference, ts.item_of_image
    match = matcher.match(gen)
    best_ssim, best_img = match.similarity.numpy().astype(np.float64), match.index.numpy()
    dist, _ = l2_nearest(gen, train, k=2)
    own_ssim = np.full(len(gen), np.nan)
    for i, it in enumerate(items):
        if it.trained:
            imgs = ts.images_of_item[it.item_id]
            block = gen[i * k : (i + 1) * k]
            s = ssim_pairs(block.repeat_interleave(len(imgs), 0), train[imgs].repeat(k, 1, 1, 1))
            own_ssim[i * k : (i + 1) * k] = s.view(k, len(imgs)).max(1).values.numpy()
    fidelity = scheme.fidelity(reader, gen, items, k) if reader is not None else np.full(len(gen), np.nan)

    rows = []
    for i, it in enumerate(items):
        sl = slice(i * k, (i + 1) * k)
        j = int(np.argmax(best_ssim[sl])) + i * k
        nn_item = int(item_of_image[best_img[j]])
        fam = scheme.family_of(it)
        thr = thresholds[fam]["threshold"]
        memorized = bool(best_ssim[j] > thr)
        rows.append({
            "item_id": it.item_id, "caption": it.caption, "kind": it.kind, "replication": it.replication,
            "group": it.group, "family": fam, "ssim_nn": round(float(best_ssim[j]), 4),
            "ssim_own": None if not it.trained else round(float(np.nanmax(own_ssim[sl])), 4),
            "nn_item_id": nn_item, "memorized": memorized,
            "match": ("own" if nn_item == it.item_id else "other") if memorized else "none",
            "threshold": round(thr, 4), "l2_nn": round(float(dist[j, 0]), 4),
            "l2_ratio": round(float(dist[j, 0] / max(float(dist[j, 1]), 1e-8)), 4),
            "memorized_seeds": int((best_ssim[sl] > thr).sum()),
            "fidelity": None if np.isnan(fidelity[sl]).all() else round(float(np.nanmean(fidelity[sl])), 4),
        })
    return rows


def label_zoo(model: DiffusionModel, items: list, reader: Any | None,
              cfg: LabelConfig = LabelConfig(), progress: bool = True,
              training_set: ZooTrainingSet | None = None, cache_dir: str | Path | None = None,
              scheme: LabelScheme = COLLAPSE_SCHEME, null_items: list | None = None,
              ) -> tuple[list[dict], dict]:
    """Label every caption of ``items`` by generating from it; returns (rows, summary).

    The null draws from ``null_items`` (default: ``items``); ``scheme`` (default: the collapse corpus's) says
    how to render a caption afresh and read its attributes back.
    """
    ts = training_set if training_set is not None else zoo_training_set(model=model)
    matcher = SSIMMatcher(cfg.candidates).fit(ts.reference)
    thresholds = null_thresholds(items if null_items is None else null_items, matcher, cfg,
                                 lambda x: vae_roundtrip(model, x), scheme)
    gen = generate(model, items, cfg, progress, cache_dir)
    rows = label_generations(gen, items, ts, matcher, thresholds, cfg.seeds_per_prompt, reader, scheme)
    summary = summarise(rows)
    summary["thresholds"] = thresholds
    summary["label_config"] = dataclasses.asdict(cfg)
    summary["ssim"] = SSIM_PARAMS
    return rows, summary


def summarise(rows: list[dict]) -> dict:
    """Memorized fraction per kind and per replication rate, and generic prompt fidelity."""
    def frac(sel: list[dict], key: str = "memorized") -> float | None:
        vals = [r[key] for r in sel if r[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    by_kind = {kind: {"n": len(sel), "memorized": frac(sel),
                      "match_own": frac([dict(r, own=r["match"] == "own") for r in sel], "own")}
               for kind in sorted({r["kind"] for r in rows}) if (sel := [r for r in rows if r["kind"] == kind])}
    sig = [r for r in rows if r["kind"] == "signature"]
    rates = sorted({r["replication"] for r in sig})
    by_rate = {str(rate): {"n": len(sel), "memorized": frac(sel)}
               for rate in rates if (sel := [r for r in sig if r["replication"] == rate])}
    fidelity = {kind: frac([r for r in rows if r["kind"] == kind], "fidelity") for kind in GENERIC_KINDS}
    return {"by_kind": by_kind, "signature_by_replication": by_rate, "generic_fidelity": fidelity,
            "n_captions": len(rows), "n_memorized": int(sum(r["memorized"] for r in rows))}
