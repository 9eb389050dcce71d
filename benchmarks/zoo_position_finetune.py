"""Can the SD-like zoo's denoiser learn *which corner* at all? A short fine-tune on position captions only.

Why: the shipped SD-like zoo reads named position back in 0.42 of its generations (zoo_sd_gates.json). Its
confusion matrix (this script's ``before`` entry) shows the denoiser places "in the center" objects in the
centre but scatters the four corner captions over the four corners at chance. Either the architecture
cannot place an object at an absolute corner (zero padding is its only absolute-position cue) or the
corner words are too rare a training signal to be learned within the build's steps. This script tells the
two apart: it continues training the shipped zoo's text encoder and UNet (from its EMA weights, fresh
AdamW, the build's loss and learning rate) on batches drawn only from trained position captions, and reads
the corners back after each ``--every`` steps on fresh seeds. Corner accuracy far above 0.25 within a few
hundred steps means the capacity is there and the build needs more position signal; staying at chance
means it needs an architectural cue. It writes a JSON record; the zoo folder is only read.

Usage::

    python benchmarks/zoo_position_finetune.py --out benchmarks/results/experiments/zoo_sd_position_finetune.json
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.models import load_model
from diffmem.provenance import portable_json
from diffmem.zoo.build import denoising_loss, encode_latents
from diffmem.zoo.load import load_corpus, zoo_folder_for
from diffmem.zoo.sd_attributes import SDAttributeReader
from diffmem.zoo.sd_corpus import render_sd_item


def corner_confusion(model, reader, items, seeds: int, steps: int) -> dict:
    """Read-back of named position on ``seeds`` generations per caption: accuracy overall, on corner captions,
    and the (named, read) confusion counts."""
    prompts = [it.caption for it in items for _ in range(seeds)]
    with torch.no_grad():
        gen = model.sample(prompts, [40_000 + i for i in range(len(prompts))], num_inference_steps=steps,
                           guidance_scale=7.5, batch_size=64, progress=False).images
    read = reader.read(gen)["position"]
    named = [it.named.position for it in items for _ in range(seeds)]
    hits = np.array([a == b for a, b in zip(named, read)])
    corner = np.array([n != "center" for n in named])
    top_bottom = np.array([a.split()[0] == b.split()[0] for a, b in zip(named, read)])
    conf = collections.Counter(f"{a} -> {b}" for a, b in zip(named, read))
    return {"position": round(float(hits.mean()), 4), "corner_captions": round(float(hits[corner].mean()), 4),
            "corner_top_bottom_right": round(float(top_bottom[corner].mean()), 4),
            "confusion": dict(sorted(conf.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="zoo:sd", help="zoo:sd, or an SD-like zoo folder whose captions name position")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--t-min", type=int, default=0, help="train only on timesteps >= this (layout is decided there)")
    ap.add_argument("--eval-captions", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--ddim-steps", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.time()
    folder = zoo_folder_for(args.model)
    if folder is None:
        raise SystemExit(f"--model {args.model}: not a zoo; expected zoo:sd, a zoo folder or its pipeline folder")
    items = [it for it in load_corpus(folder) if it.kind == "generic" and it.named.position]
    if len(items) < args.eval_captions:
        raise SystemExit(f"--model {args.model}: {len(items)} trained captions name a position; expected at least "
                         f"--eval-captions={args.eval_captions} (build 4 names none: give a build-3 zoo folder)")
    model = load_model(str(folder / "pipeline"))
    reader = SDAttributeReader.load(folder / "attribute_reader")
    rng = np.random.default_rng(0)
    evaluated = [items[i] for i in sorted(rng.choice(len(items), args.eval_captions, replace=False))]
    pairs = [(k, c) for k, it in enumerate(items) for c in range(len(it.image_seeds))]
    pixels = torch.from_numpy(np.stack([render_sd_item(items[k], c) for k, c in pairs])).permute(0, 3, 1, 2)
    pixels = pixels.float() / 127.5 - 1.0
    with torch.no_grad():
        lat_mean, lat_std = encode_latents(model.vae, pixels)
    token_ids = model.tokenizer([it.caption for it in items], padding="max_length",
                                max_length=model.tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
    item_of_pair = torch.tensor([k for k, _ in pairs])
    scale = model.vae.config.scaling_factor
    alphas = model.alphas_cumprod.float()
    unet, text = model.unet, model.text_encoder
    params = list(unet.parameters()) + list(text.parameters())
    for p in params:  # loaded for inference (frozen); this experiment trains them in memory only
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    record = {"model": args.model, "fingerprint": model.fingerprint, "captions_trained_on": len(items),
              "images_trained_on": len(pairs), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()},
              "probes": [{"step": 0, **corner_confusion(model, reader, evaluated, args.seeds, args.ddim_steps)}]}
    print(record["probes"][-1], flush=True)
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        unet.train()
        text.train()
        idx = torch.randint(0, len(pairs), (args.batch,), generator=g)
        loss = denoising_loss(unet, text, lat_mean[idx], lat_std[idx], token_ids[item_of_pair[idx]], alphas, scale, g,
                              t_min=args.t_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.every == 0:
            unet.eval()
            text.eval()
            record["probes"].append({"step": step, "loss": round(loss.item(), 4),
                                     **corner_confusion(model, reader, evaluated, args.seeds, args.ddim_steps)})
            print(record["probes"][-1], flush=True)
    record["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(portable_json(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
