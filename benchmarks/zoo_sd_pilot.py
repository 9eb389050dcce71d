"""PILOT (not a zoo build): a short training of a small UNet on the SD-like corpus, to see whether ordinary
captions already vary across seeds and duplicated ones start to repeat. Results are a pilot's, from a
model trained for minutes, not the issue's after-training gates.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/zoo_sd_pilot.py \
        --out benchmarks/results/experiments/zoo_sd_pilot.json --work runs/zoo-sd-pilot

The VAE is the shipped zoo's (frozen); text encoder + UNet are trained with the zoo's own loop
(:func:`diffmem.zoo.build.train_denoiser`: SD's epsilon loss, 10% caption dropout, EMA), resumable from
``--work``. Then 8 seeds per caption (DDIM, CFG 7.5) and, per caption kind, the mean pairwise SSIM of a
caption's generations across seeds and the best SSIM of a generation with the caption's own training
image (both through the VAE).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.eval.similarity import pairwise_ssim, ssim_pairs
from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json
from diffmem.zoo.architecture import ArchitectureConfig
from diffmem.zoo.build import TrainConfig, TrainingImages, ZooConfig, train_denoiser
from diffmem.zoo.gate import load_zoo_vae
from diffmem.zoo.sd_corpus import SDCorpusConfig, build_sd_corpus, render_sd_item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/experiments/zoo_sd_pilot.json")
    parser.add_argument("--work", default="runs/zoo-sd-pilot", help="checkpoint folder (rerun to resume)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--per-kind", type=int, default=16, help="captions per kind sampled")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="a tiny corpus, to check the script runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    corpus = SDCorpusConfig()
    if args.smoke:
        corpus = SDCorpusConfig(n_base=4, n_extended=1, titles_per_family=40, signatures_per_rate=1,
                                heldout_signature_per_family=4, template_groups_per_family=1)
    items = build_sd_corpus(corpus)
    data = TrainingImages.for_corpus("sd", items)
    arch = ArchitectureConfig(unet_channels=(32, 64, 64), text_width=64)
    cfg = ZooConfig(seed=0, corpus=corpus, arch=arch,
                    train=TrainConfig(unet_steps=args.steps, unet_batch=args.batch, warmup_steps=50,
                                      checkpoint_every=50))
    vae = load_zoo_vae()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from diffmem.models.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(work / "tokenizer", model_max_length=arch.max_tokens)
    text_encoder, unet, scheduler, train_seconds = train_denoiser(cfg, data, vae, tokenizer, work)

    from diffusers import StableDiffusionPipeline

    from diffmem.models.loader import load_model

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    model = load_model(pipe)
    rng = np.random.default_rng(0)
    groups = {
        "generic": [it for it in items if it.kind == "generic"],
        "title (once-seen)": [it for it in items if it.kind == "title"],
        "signature 64x": [it for it in items if it.kind == "signature" and it.replication == 64],
        "signature 16x": [it for it in items if it.kind == "signature" and it.replication == 16],
        "heldout_signature": [it for it in items if it.kind == "heldout_signature"],
    }
    chosen = {k: [v[i] for i in np.sort(rng.permutation(len(v))[: args.per_kind])] for k, v in groups.items()}
    prompts = [it.caption for v in chosen.values() for it in v for _ in range(args.seeds)]
    seeds = list(range(len(prompts)))
    gen = model.sample(prompts, seeds, num_inference_steps=args.sample_steps, guidance_scale=7.5,
                       batch_size=64).images
    results, pos = {}, 0
    for kind, sel in chosen.items():
        across, own = [], []
        for it in sel:
            block = gen[pos : pos + args.seeds]
            pos += args.seeds
            across.append(float(pairwise_ssim(block, len(block))[0]))
            if it.trained and len(it.image_seeds) == 1:  # titles and signatures: one training image
                ref = torch.from_numpy(render_sd_item(it)).permute(2, 0, 1)[None].float() / 255.0
                with torch.no_grad():
                    ref = ((vae.decode(vae.encode(ref * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
                own.append(float(ssim_pairs(block, ref.expand_as(block)).max()))
        results[kind] = {"n_captions": len(sel),
                         "mean_pairwise_ssim_across_seeds": round(float(np.mean(across)), 4),
                         "best_ssim_to_own_training_image": round(float(np.mean(own)), 4) if own else None}
        print(kind, results[kind], flush=True)
    record = {"benchmark": "zoo_sd_pilot", "label": "PILOT: minutes of training, not a zoo build",
              "corpus": dataclasses.asdict(corpus), "arch": dataclasses.asdict(arch),
              "train": dataclasses.asdict(cfg.train), "train_seconds": round(train_seconds, 1),
              "epochs": round(args.steps * args.batch / len(data.image_of_pair), 3),
              "seeds_per_caption": args.seeds, "sample_steps": args.sample_steps, "results": results,
              "note": "ordinary captions should vary across seeds (low SSIM), memorized ones repeat (high); "
                      "best_ssim_to_own_training_image: titles and signatures (one training image each)",
              "seconds": round(time.time() - started, 1)}
    atomic_write_text(Path(args.out), portable_json(record))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
