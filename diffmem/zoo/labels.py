"""Ground truth by extraction: which zoo captions make the model reproduce a training image.

For every caption we generate ``k`` images (DDIM, CFG) and find each one's nearest training image
(pixel L2 shortlist, then SSIM), training images taken through the zoo's VAE (see
:class:`~diffmem.zoo.load.ZooTrainingSet` for why). A caption is *memorized* when its best SSIM exceeds a threshold that
an ideal generaliser would exceed only ``1 - null_quantile`` of the time: the same statistic computed
on ``k`` independent renders of the caption (fresh jitter, fresh texture) against its training images.
The match is ``own`` when the nearest image is the caption's own training image (matching verbatim)
and ``other`` when it is another caption's (template-like). Pixel L2 to the two nearest neighbours is
recorded too (Gu et al. 2025's ratio d1/d2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.eval.matching import SSIMMatcher
from diffmem.eval.similarity import SSIM_PARAMS, l2_nearest, ssim_pairs
from diffmem.io import atomic_torch_save
from diffmem.models.model import DiffusionModel
from diffmem.zoo.attributes import AttributeReader, attribute_accuracy
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


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def null_thresholds(items: list[ZooItem], matcher: SSIMMatcher, cfg: LabelConfig, roundtrip) -> dict[str, dict]:
    """Per caption family: the ``null_quantile`` of the labelling statistic computed on what an ideal
    generaliser would produce: ``k`` independent renders of a caption (fresh jitter and texture, through
    the VAE like any generation), each matched against the *whole* training set exactly as generations
    are, best of ``k``."""
    rng = np.random.default_rng(cfg.null_seed)
    out: dict[str, dict] = {}
    k = cfg.seeds_per_prompt
    for fam in ("object", "scene"):
        pool = [it for it in items if it.trained and family(it.kind) == fam]
        chosen = [pool[i] for i in rng.permutation(len(pool))[: cfg.null_captions]]
        fresh = []
        for item in chosen:
            for _ in range(k):
                spec = item.spec
                if spec.texture_seed is not None:  # an independent image of this caption has its own texture
                    spec = dataclasses.replace(spec, texture_seed=int(rng.integers(2**31)))
                fresh.append(render(spec, int(rng.integers(2**31))))
        sims = matcher.match(roundtrip(_to_unit(fresh))).similarity.view(len(chosen), k).amax(1).numpy()
        out[fam] = {"threshold": float(np.quantile(sims, cfg.null_quantile)), "n": len(sims),
                    "median": float(np.median(sims)), "max": float(sims.max())}
    return out


def label_zoo(model: DiffusionModel, items: list[ZooItem], reader: AttributeReader | None,
              cfg: LabelConfig = LabelConfig(), progress: bool = True,
              training_set: ZooTrainingSet | None = None, cache_dir: str | Path | None = None
              ) -> tuple[list[dict], dict]:
    """Label every caption of the corpus by generating from it; returns (rows, summary)."""
    ts = training_set if training_set is not None else zoo_training_set(model=model)
    train, item_of_image = ts.reference, ts.item_of_image
    matcher = SSIMMatcher(cfg.candidates).fit(train)
    thresholds = null_thresholds(items, matcher, cfg, lambda x: vae_roundtrip(model, x))

    k = cfg.seeds_per_prompt
    captions = [it.caption for it in items]
    prompts = [c for c in captions for _ in range(k)]
    seeds = [cfg.seed_offset + it.item_id * k + j for it in items for j in range(k)]
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([model.fingerprint, dataclasses.asdict(cfg), captions]).encode()).hexdigest()
        cache_file = Path(cache_dir) / f"generations-{key[:16]}.pt"
    if cache_file is not None and cache_file.is_file():
        gen = torch.load(cache_file, weights_only=True).float() / 255
    else:
        gen = model.sample(prompts, seeds, num_inference_steps=cfg.num_inference_steps,
                           guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size, progress=progress).images
        gen = (gen * 255).round() / 255  # stored as 8-bit images, like any generated image file
        if cache_file is not None:
            atomic_torch_save((gen * 255).round().to(torch.uint8), cache_file)

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

    fidelity = np.full(len(gen), np.nan)
    generic_rows = [i for i, it in enumerate(items) if it.kind in GENERIC_KINDS]
    if reader is not None and generic_rows:
        sample_idx = [i * k + j for i in generic_rows for j in range(k)]
        objs = [items[i].spec.objects[0] for i in generic_rows for _ in range(k)]
        bgs = [items[i].spec.background for i in generic_rows for _ in range(k)]
        fidelity[sample_idx] = attribute_accuracy(reader, gen[sample_idx], objs, bgs)["all"]

    rows = []
    for i, it in enumerate(items):
        sl = slice(i * k, (i + 1) * k)
        j = int(np.argmax(best_ssim[sl])) + i * k
        nn_item = int(item_of_image[best_img[j]])
        thr = thresholds[family(it.kind)]["threshold"]
        memorized = bool(best_ssim[j] > thr)
        rows.append({
            "item_id": it.item_id, "caption": it.caption, "kind": it.kind, "replication": it.replication,
            "group": it.group, "family": family(it.kind), "ssim_nn": round(float(best_ssim[j]), 4),
            "ssim_own": None if not it.trained else round(float(np.nanmax(own_ssim[sl])), 4),
            "nn_item_id": nn_item, "memorized": memorized,
            "match": ("own" if nn_item == it.item_id else "other") if memorized else "none",
            "threshold": round(thr, 4), "l2_nn": round(float(dist[j, 0]), 4),
            "l2_ratio": round(float(dist[j, 0] / max(float(dist[j, 1]), 1e-8)), 4),
            "memorized_seeds": int((best_ssim[sl] > thr).sum()),
            "fidelity": None if np.isnan(fidelity[sl]).all() else round(float(np.nanmean(fidelity[sl])), 4),
        })
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
