"""Benchmark: MemControl's parameter selection vs full fine-tuning and plain LoRA on a zoo fine-tuning set.

The zoo is the pretrained base. The fine-tuning set (built deterministically here, the zoo
extension for this method): fresh renders of trained generic captions, once each, plus ``n_dup``
look-alike scene captions the base never saw (``heldout_signature``), each duplicated ``copies``
times. Memorization = share of generations of the duplicated captions that match their fine-tuning
image (SSIM above the zoo's scene threshold, against the image taken through the zoo's VAE, as the
zoo's labels do: the VAE alone costs a raw render 0.4-0.6 SSIM, below any threshold); quality =
prompt fidelity on generic captions.

    .venv/bin/python benchmarks/memcontrol.py --out benchmarks/results/memcontrol.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.eval.similarity import ssim_pairs
from diffmem.io import atomic_write_text
from diffmem.mitigators.memcontrol import FinetuneData, MemControlSearch, finetune, transformer_blocks
from diffmem.models import load_model
from diffmem.tasks.zoo import zoo_object_fidelity as zoo_fidelity
from diffmem.zoo.corpus import render
from diffmem.zoo.load import load_corpus, load_labels, vae_roundtrip
from diffmem.zoo.paths import zoo_dir


def build_set(model, n_generic: int, n_dup: int, copies: int, seed: int = 0):
    items = load_corpus(zoo_dir())
    rng = np.random.default_rng(seed)
    generic = [it for it in items if it.kind == "generic"]
    gen_sel = [generic[i] for i in rng.permutation(len(generic))[:n_generic]]
    dup = [it for it in items if it.kind == "heldout_signature"][:n_dup]
    dup_images = [render(it.spec, int(rng.integers(2**31))) for it in dup]
    images = [render(it.spec, int(rng.integers(2**31))) for it in gen_sel] + [im for im in dup_images
                                                                             for _ in range(copies)]
    captions = [it.caption for it in gen_sel] + [it.caption for it in dup for _ in range(copies)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    lat = torch.cat([model.encode_images(x[i : i + 256]) for i in range(0, len(x), 256)])
    emb = model.encode_prompts(captions)
    dup_x = torch.from_numpy(np.stack(dup_images)).permute(0, 3, 1, 2).float() / 255
    return FinetuneData(lat, emb), [it.caption for it in dup], vae_roundtrip(model, dup_x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memcontrol.json")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--full-lr", type=float, default=4e-4, help="learning rate of the full fine-tuning baseline")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the plain LoRA baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_model()
    data, dup_captions, dup_images = build_set(base, n_generic=600, n_dup=10, copies=args.copies)
    threshold = json.loads((zoo_dir() / "zoo.json").read_text())["labels"]["thresholds"]["scene"]["threshold"]
    generic = [r["caption"] for r in load_labels(zoo_dir()) if r["kind"] == "generic"][1::9][:64]

    def evaluate(model) -> tuple[float, float]:
        k = 2
        imgs = model.sample([c for c in dup_captions for _ in range(k)], [j for _ in dup_captions for j in range(k)],
                            num_inference_steps=20).images
        mem = float((ssim_pairs(imgs, dup_images.repeat_interleave(k, 0)) > threshold).float().mean())
        gen = model.sample(generic, list(range(len(generic))), num_inference_steps=20).images
        return mem, zoo_fidelity(gen, generic)

    blocks = transformer_blocks(base.unet)
    total = sum(p.numel() for p in base.unet.parameters())
    results: dict = {"base": dict(zip(("memorization", "fidelity"), evaluate(base)))}
    for name, family, lr in [("full-finetune", "full", args.full_lr), ("lora-all-blocks", "attention", args.lora_lr)]:
        start = time.perf_counter()
        model, n = finetune(base, data, family, blocks, lr, args.steps, 32, 4, 0)
        mem, fid_ = evaluate(model)
        results[name] = {"memorization": mem, "fidelity": fid_, "tuned_fraction": n / total, "lr": lr,
                         "seconds": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    search = MemControlSearch(family="attention", trials=args.trials, steps=args.steps)
    found = search.run(base, data, evaluate)
    results["memcontrol"] = found["chosen"] | {"seconds": round(time.perf_counter() - start, 1)}
    record = {"benchmark": "memcontrol", "model": base.describe(), "fine_tune_set": {
        "generic_images": 600, "duplicated_captions": len(dup_captions), "copies": args.copies,
        "steps": args.steps, "batch": 32}, "blocks": blocks, "results": results, "trials": found["trials"],
        "pareto_trials": found["pareto"]}
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
