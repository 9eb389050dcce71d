"""Benchmark: which matcher tells a copy of a training image from a new image of the same caption?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/matcher_planted.py --model zoo:sd \
        --out benchmarks/results/matcher_planted_sd.json

The DeepSSIM paper's protocol (2025) on a zoo: known copies are planted and scored against non-copies.
- **Copies** of ``--sources`` training images, each planted six ways: exact, shifted (2 px, edges
  replicated), cropped (the centre 24 of 32 px, resized back), flipped (left-right), colour-jittered
  (brightness and contrast x U(0.8, 1.2)) and partial (the left half of the training image beside the right
  half of another one: one object copied).
- **Non-copies**: for each source, a fresh render of its caption (the caption's named factors kept, everything
  else drawn anew): the image a model that learned the caption but not the picture would draw, the hardest
  honest negative.
Both go through the zoo's VAE, as generations do, and each is scored against the whole training index.

Matchers: pixel SSIM (the labeller's: pixel-L2 shortlist of 8, then SSIM), Carlini et al.'s tiled L2 (the
largest of 16 tile distances, negated), VAE-latent L2 (negated), the zoo's trained DeepSSIM embedding
(cosine), and the nearest-neighbour margin (Gu et al. 2025: pixel L2 to the nearest over the second nearest
training image, negated). Per matcher, on the test half of the sources: AUROC of all copies and of each planting
against the non-copies; at the threshold the dev half's non-copies pass at ``--fpr`` (the labeller's rule),
each planting's recall and F1 (its copies against as many non-copies). Every score is kept in
``<out stem>_scores.parquet``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score

from diffmem.io import atomic_write_text

PLANTINGS = ("exact", "shifted", "cropped", "flipped", "colour", "partial")


def plant(images: torch.Tensor, partners: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The six plantings of ``images`` ``(N, 3, H, W)``; ``partners`` give the partial copies' other half."""
    import torch.nn.functional as F

    from diffmem.eval.similarity import resize_images

    n, _, h, w = images.shape
    crop = int(round(h * 0.75))
    top = (h - crop) // 2
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (n, 2))).float()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    colour = ((images - mean) * gain[:, 0, None, None, None] + mean) * gain[:, 1, None, None, None]
    partial = images.clone()
    partial[..., w // 2:] = partners[..., w // 2:]
    return {"exact": images,
            "shifted": F.pad(images, (2, 0, 2, 0), mode="replicate")[..., :h, :w],
            "cropped": resize_images(images[..., top:top + crop, top:top + crop], (h, w)),
            "flipped": images.flip(-1), "colour": colour.clamp(0, 1), "partial": partial}


def tiled_l2_nearest(queries: torch.Tensor, index: torch.Tensor, tiles: int = 4, chunk: int = 128) -> torch.Tensor:
    """Carlini et al.'s tiled L2 of each query to its nearest index image: min over images of the max over
    ``tiles x tiles`` tiles of the tile L2 / sqrt(tile size)."""
    def cut(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        th, tw = h // tiles, w // tiles
        x = x[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw)
        return x.permute(2, 4, 0, 1, 3, 5).reshape(tiles * tiles, n, -1)

    t_index = cut(index.float())
    out = []
    for s in range(0, len(queries), chunk):
        t_q = cut(queries[s:s + chunk].float())
        d = torch.cdist(t_q, t_index) / (t_q.shape[-1] ** 0.5)  # (tiles^2, q, M)
        out.append(d.amax(0).amin(1))
    return torch.cat(out)


def scores(queries: torch.Tensor, reference: torch.Tensor, latents_of, deepssim) -> dict[str, np.ndarray]:
    """Every matcher's copy score of ``queries`` against ``reference`` (higher = more copy-like)."""
    from diffmem.eval.matching import DeepSSIMMatcher, SSIMMatcher
    from diffmem.eval.similarity import l2_nearest

    d, _ = l2_nearest(queries, reference, k=2)
    lat_q, lat_r = latents_of(queries), latents_of(reference)
    d_lat, _ = l2_nearest(lat_q, lat_r, k=1)
    return {"ssim": SSIMMatcher(8).fit(reference).match(queries).similarity.numpy(),
            "tiled_l2": -tiled_l2_nearest(queries, reference).numpy(),
            "latent_l2": -d_lat[:, 0].numpy(),
            "deepssim": DeepSSIMMatcher(deepssim).fit(reference).match(queries).similarity.numpy(),
            "nn_margin": -(d[:, 0] / d[:, 1].clamp_min(1e-8)).numpy()}


def evaluate(pos: dict[str, np.ndarray], neg: np.ndarray, dev_neg: np.ndarray, fpr: float = 0.01) -> dict:
    """On the test sources: AUROC of all copies and of each planting against the non-copies; at the threshold
    the dev non-copies pass at ``fpr`` (the labeller's rule: a per-generation null level), each planting's
    recall, the test non-copies' rate and F1 per planting (its copies against as many non-copies)."""
    all_pos = np.concatenate(list(pos.values()))
    y = np.r_[np.ones(len(all_pos)), np.zeros(len(neg))]
    t = float(np.quantile(dev_neg, 1 - fpr, method="higher"))
    out = {"auroc": round(float(roc_auc_score(y, np.r_[all_pos, neg])), 4),
           "auroc_by_planting": {k: round(float(roc_auc_score(np.r_[np.ones(len(v)), np.zeros(len(neg))],
                                                              np.r_[v, neg])), 4) for k, v in pos.items()},
           "threshold_at_dev_fpr": round(t, 6), "fpr_test": round(float((neg > t).mean()), 4),
           "recall_by_planting": {k: round(float((v > t).mean()), 4) for k, v in pos.items()},
           "f1_by_planting": {k: round(float(f1_score(np.r_[np.ones(len(v)), np.zeros(len(neg))],
                                                      np.r_[v, neg] > t)), 4) for k, v in pos.items()}}
    out["mean_f1"] = round(float(np.mean(list(out["f1_by_planting"].values()))), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:sd", help="zoo:sd (default); the zoo whose training images are planted")
    ap.add_argument("--sources", type=int, default=300, help="training images planted (default: 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fpr", type=float, default=0.01, help="non-copies' rate the threshold allows (default: 0.01)")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)

    from diffmem.eval.deepssim import DeepSSIM
    from diffmem.models.loader import load_model
    from diffmem.zoo.load import load_corpus, vae_roundtrip, zoo_folder_for, zoo_training_set
    from diffmem.zoo.sd_labels import fresh_sd_image

    start = time.perf_counter()
    zoo = zoo_folder_for(args.model)
    if zoo is None:
        raise SystemExit(f"--model {args.model}: expected a zoo")
    model = load_model(args.model)
    ts = zoo_training_set(zoo)
    items = {it.item_id: it for it in load_corpus(zoo)}
    rng = np.random.default_rng(args.seed)
    src = rng.choice(len(ts.images), size=args.sources, replace=False)
    partners = rng.choice(len(ts.images), size=args.sources, replace=True)
    planted = plant(ts.images[src], ts.images[partners], rng)
    fresh = torch.from_numpy(np.stack([fresh_sd_image(items[int(ts.item_of_image[i])], rng) for i in src]))
    fresh = fresh.permute(0, 3, 1, 2).float() / 255.0

    def through_vae(x: torch.Tensor) -> torch.Tensor:
        return (vae_roundtrip(model, x) * 255).round().clamp(0, 255) / 255  # 8-bit, as a saved generation

    def latents_of(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.encode_images(x[i:i + 512]).cpu() for i in range(0, len(x), 512)])

    deepssim = DeepSSIM.load(zoo / "deepssim")
    names = list(PLANTINGS)
    queries = torch.cat([through_vae(planted[k]) for k in names] + [through_vae(fresh)])
    s = scores(queries, ts.reference, latents_of, deepssim)
    n = args.sources
    dev = np.arange(n) < n // 2  # the first half of the sources chooses each threshold
    results = {}
    for matcher, v in s.items():
        pos = {k: v[i * n:(i + 1) * n] for i, k in enumerate(names)}
        neg = v[len(names) * n:]
        results[matcher] = evaluate({k: p[~dev] for k, p in pos.items()}, neg[~dev], neg[dev], args.fpr)
    best = max(results, key=lambda m: (results[m]["mean_f1"], results[m]["auroc"]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = [k for k in names for _ in range(n)] + ["non-copy"] * n
    source = np.tile(src, len(names) + 1)
    table = pa.table({"planting": kind, "source_image": source.tolist(), "dev": np.tile(dev, len(names) + 1).tolist(),
                      **{m: pa.array(v, pa.float64()) for m, v in s.items()}})
    out = Path(args.out)
    pq.write_table(table, out.with_name(f"{out.stem}_scores.parquet"), compression="zstd")
    record = {"model": {"name": args.model, "fingerprint": model.fingerprint},
              "protocol": {"sources": n, "plantings": names, "negatives": "fresh render of the source's caption",
                           "seed": args.seed, "dev_sources": int(dev.sum()), "test_sources": int((~dev).sum()),
                           "index": "the zoo's unique training images through its VAE",
                           "threshold": f"the dev non-copies' {1 - args.fpr:g} quantile (FPR {args.fpr:g})"},
              "matchers": results, "best_by_mean_f1": best, "scores_file": f"{out.stem}_scores.parquet",
              "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(out, json.dumps(record, indent=2))
    for m, r in results.items():
        print(f"{m:10s} AUROC {r['auroc']:.4f}  mean F1 {r['mean_f1']:.4f}  FPR {r['fpr_test']:.3f}  recall "
              + " ".join(f"{k} {a:.2f}" for k, a in r["recall_by_planting"].items()))
    print(f"best by mean F1 over plantings: {best}")


if __name__ == "__main__":
    main()
