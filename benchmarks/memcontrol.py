"""Benchmark: MemControl's parameter selection vs full fine-tuning and LoRA on every block, on a
fine-tuning set with a new domain to learn and duplicated titles that tempt memorization.

The zoo is the pretrained base. The fine-tuning set (:func:`diffmem.zoo.finetune_sets.build_sd_domain_set`,
deterministic from ``--seed``) comes from the SD-like zoo corpus, a domain the shipped zoo never saw:
every "painting"/"poster" x colour x shape caption with ``--train-images`` fresh images each (the part
to learn) and ``--titles-per-family`` identifier-like titles per style, one image each repeated
``--copies`` times (the part that tempts memorization). Learnt captions and titles are split into dev
and test halves.

Per variant (base, full fine-tuning, LoRA on every transformer block, MemControl's selected mask):

- **new-domain quality**: held-out denoising loss (:func:`diffmem.eval.quality.heldout_denoising_loss`,
  fixed timesteps and noise) on held-out images of the learnt captions, and its relative drop from the
  base model (``quality_gain``, higher = more learnt);
- **extraction**: share of generations of the duplicated titles whose SSIM-nearest fine-tuning image
  (all of them through the zoo's VAE, as the zoo's labels do) is their own image above the zoo's scene
  threshold (:func:`diffmem.eval.finetune_domain.title_extraction`);
- **fidelity**: the zoo's attribute read-back on its ordinary single-object captions;
- share of UNet parameters trained and seconds.

Held-out protocol: MemControl's search sees only dev figures (dev held-out images, dev titles, dev
generation seeds, dev noise seed); every reported figure is on the test half. The baselines'
learning rates are fixed flags, not tuned here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memcontrol.py --out benchmarks/results/memcontrol.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memcontrol.py --smoke --out /tmp/memcontrol_smoke.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.eval.finetune_domain import SPLITS, DomainFinetuneSet, title_extraction, to_tensor
from diffmem.eval.quality import HELDOUT_TIMESTEPS, heldout_denoising_loss, relative_improvement
from diffmem.eval.similarity import ssim_pairs
from diffmem.io import atomic_write_text
from diffmem.mitigators.memcontrol import (
    FinetuneData,
    MemControlSearch,
    finetune,
    noise_norm_memorization,
    transformer_blocks,
)
from diffmem.models import load_model
from diffmem.provenance import portable_json
from diffmem.tasks.zoo import zoo_object_fidelity
from diffmem.zoo.corpus import render
from diffmem.zoo.finetune_sets import build_sd_domain_set
from diffmem.zoo.load import load_corpus, load_labels, vae_roundtrip
from diffmem.zoo.paths import zoo_dir

NOISE_SEEDS = {"dev": 1, "test": 2}  # the loss's fixed noise differs between the halves
GEN_SEED_OFFSET = {"dev": 0, "test": 10_000}  # and so do the generation seeds


def encode_set(model, data: DomainFinetuneSet) -> FinetuneData:
    captions, images = data.training_examples()
    x = to_tensor(images)
    lat = torch.cat([model.encode_images(x[i : i + 256]).cpu() for i in range(0, len(x), 256)])
    return FinetuneData(lat, model.encode_prompts(captions))


def zoo_domain_loss(model, n: int, noise_seed: int) -> float:
    """The base's loss on fresh renders of captions it was trained on: the level a learnt domain reaches."""
    items = [it for it in load_corpus(zoo_dir("collapse")) if it.kind == "generic"]
    rng = np.random.default_rng(7)
    sel = [items[int(i)] for i in rng.permutation(len(items))[:n]]
    x = to_tensor(np.stack([render(it.spec, int(rng.integers(2**31))) for it in sel]))
    return float(heldout_denoising_loss(model, x, [it.caption for it in sel], noise_seed=noise_seed).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memcontrol.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline, not the figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning set")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--copies", type=int, default=32, help="copies of each duplicated title")
    parser.add_argument("--titles-per-family", type=int, default=8, help="duplicated titles per style (half dev)")
    parser.add_argument("--train-images", type=int, default=8, help="fine-tuning images per learnt caption")
    parser.add_argument("--heldout-images", type=int, default=4, help="held-out images per learnt caption")
    parser.add_argument("--generations", type=int, default=4, help="generations per title for extraction")
    parser.add_argument("--fidelity-captions", type=int, default=64)
    parser.add_argument("--full-lr", type=float, default=4e-4, help="learning rate of the full fine-tuning baseline")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA-on-every-block baseline")
    parser.add_argument("--lr-range", type=float, nargs=2, default=(1e-4, 1e-2), help="MemControl lr range")
    parser.add_argument("--search-signal", choices=("extraction", "noise-norm"), default="extraction",
                        help="MemControl's memorization term on the dev titles: the extraction share (budget "
                             "--budget) or the paper's first-step noise norm (budget: --noise-norm-factor x the "
                             "base model's)")
    parser.add_argument("--budget", type=float, default=0.05, help="memorization budget of the extraction signal")
    parser.add_argument("--noise-norm-factor", type=float, default=1.25)
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.steps, args.batch, args.copies = 2, 3, 8, 4
        args.titles_per_family, args.train_images, args.heldout_images = 2, 2, 1
        args.generations, args.fidelity_captions = 2, 8
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = load_model("zoo:collapse")
    blocks = transformer_blocks(base.unet)
    total = sum(p.numel() for p in base.unet.parameters())
    data_set = build_sd_domain_set(args.seed, args.train_images, args.heldout_images, args.titles_per_family,
                                   args.copies)
    data = encode_set(base, data_set)
    index_images, index_owner = data_set.unique_training_images()
    index = vae_roundtrip(base, to_tensor(index_images))
    threshold = json.loads((zoo_dir("collapse") / "zoo.json").read_text())["labels"]["thresholds"]["scene"]["threshold"]
    # how close two *independent* images of one learnt caption come (through the VAE): the threshold must
    # lie above this for a match to mean a copy
    k = data_set.train_images.shape[1]
    learnt_rt = index[: len(data_set.learn_captions) * k].view(len(data_set.learn_captions), k, *index.shape[1:])
    independent = ssim_pairs(learnt_rt[:, 0], learnt_rt[:, 1]) if k > 1 else torch.zeros(0)
    heldout = {s: data_set.heldout(s) for s in SPLITS}
    heldout_x = {s: to_tensor(heldout[s][1]) for s in SPLITS}
    collapse_labels = load_labels(zoo_dir("collapse"))
    generic = [r["caption"] for r in collapse_labels if r["kind"] == "generic"][1::9][: args.fidelity_captions]
    setup_seconds = time.perf_counter() - t0

    def losses(model, split: str) -> float:
        return float(heldout_denoising_loss(model, heldout_x[split], heldout[split][0],
                                            noise_seed=NOISE_SEEDS[split]).mean())

    def extraction(model, split: str) -> dict:
        titles = data_set.title_indices(split)
        owner = [j for j in titles for _ in range(args.generations)]
        seeds = [GEN_SEED_OFFSET[split] + g for _ in titles for g in range(args.generations)]
        gens = model.sample([data_set.titles[j] for j in owner], seeds, num_inference_steps=20).images
        return title_extraction(gens, owner, index, index_owner.tolist(), threshold)

    base_loss = {s: losses(base, s) for s in SPLITS}
    base_noise_norm = noise_norm_memorization(base, [data_set.titles[j] for j in data_set.title_indices("dev")])

    def evaluate_dev(model) -> dict[str, float]:
        """What the search sees: dev titles, dev held-out images, dev seeds."""
        loss = losses(model, "dev")
        ext = extraction(model, "dev")
        nn_ = noise_norm_memorization(model, [data_set.titles[j] for j in data_set.title_indices("dev")])
        mem = ext["share"] if args.search_signal == "extraction" else nn_
        return {"memorization": mem, "quality": relative_improvement(base_loss["dev"], loss),
                "dev_loss": loss, "dev_extraction": ext["share"], "dev_noise_norm": nn_}

    def report(model) -> dict:
        """Every reported figure: test titles, test held-out images, test seeds; zoo fidelity."""
        loss = losses(model, "test")
        ext = extraction(model, "test")
        gen = model.sample(generic, list(range(len(generic))), num_inference_steps=20).images
        return {"extraction": ext["share"], "own_ssim_mean": round(float(np.mean(ext["own_ssim"])), 4),
                "new_domain_loss": round(loss, 5),
                "new_domain_quality_gain": round(relative_improvement(base_loss["test"], loss), 4),
                "fidelity": zoo_object_fidelity(gen, generic)}

    record: dict = {
        "benchmark": "memcontrol", "model": base.describe(), "smoke": args.smoke,
        "fine_tune_set": data_set.summary() | {"steps": args.steps, "batch": args.batch},
        "protocol": {"search_sees": "dev titles, dev held-out images, dev generation seeds, dev noise seed",
                     "reported": "test titles, test held-out images, test generation seeds, test noise seed; "
                                 "zoo fidelity on generic captions[1::9]",
                     "tuned_on_dev": "MemControl's block mask and learning rate",
                     "not_tuned": f"baseline learning rates (full {args.full_lr}, LoRA {args.lora_lr}), steps, rank"},
        "extraction_threshold": {"ssim": threshold, "source": "zoo.json labels.thresholds.scene (independent "
                                 "renders of the zoo's scene captions)",
                                 "new_domain_independent_ssim": {
                                     "n": len(independent),
                                     "p99": round(float(independent.quantile(0.99)), 4) if len(independent) else None,
                                     "max": round(float(independent.max()), 4) if len(independent) else None}},
        "quality_term": {"name": "held-out denoising loss (epsilon MSE)", "timesteps": list(HELDOUT_TIMESTEPS),
                         "noise_seeds": NOISE_SEEDS, "gain": "(base - model) / base"},
        "new_domain_check": {"base_new_domain_loss": {s: round(v, 5) for s, v in base_loss.items()},
                             "base_zoo_domain_loss": round(zoo_domain_loss(base, max(16, len(heldout_x["test"])),
                                                                           NOISE_SEEDS["test"]), 5)},
        "blocks": blocks, "search": {"signal": args.search_signal, "lr_range": list(args.lr_range),
                                     "base_dev_noise_norm": base_noise_norm},
        "setup_seconds": round(setup_seconds, 1), "results": {}}
    check = record["new_domain_check"]
    check["base_loss_ratio_new_over_zoo"] = round(base_loss["test"] / check["base_zoo_domain_loss"], 3)
    out = Path(args.out)

    def save() -> None:
        atomic_write_text(out, portable_json(record))

    start = time.perf_counter()
    record["results"]["base"] = report(base) | {"tuned_fraction": 0.0, "seconds": round(time.perf_counter() - start, 1)}
    save()
    for name, family, lr in [("full-finetune", "full", args.full_lr), ("lora-all-blocks", "attention", args.lora_lr)]:
        start = time.perf_counter()
        model, n = finetune(base, data, family, blocks, lr, args.steps, args.batch, 4, 0)
        train_s = time.perf_counter() - start
        record["results"][name] = report(model) | {"tuned_fraction": n / total, "lr": lr,
                                                   "train_seconds": round(train_s, 1),
                                                   "seconds": round(time.perf_counter() - start, 1)}
        save()
        del model
    budget = args.budget if args.search_signal == "extraction" else args.noise_norm_factor * base_noise_norm
    trained: list = []

    def evaluate_and_keep(model) -> dict[str, float]:
        trained.append(model)
        return evaluate_dev(model)

    start = time.perf_counter()
    search = MemControlSearch(family="attention", trials=args.trials, steps=args.steps, batch=args.batch,
                              lr_range=tuple(args.lr_range), memorization_budget=budget)
    found = search.run(base, data, evaluate_and_keep)
    search_s = time.perf_counter() - start
    chosen = found["chosen"]
    record["results"]["memcontrol"] = report(trained[chosen["trial"]]) | {
        "tuned_fraction": chosen["tuned_fraction"], "lr": chosen["lr"], "blocks": chosen["blocks"],
        "trial": chosen["trial"], "search_seconds": round(search_s, 1),
        "seconds": round(time.perf_counter() - start, 1)}
    record["search"] |= {"memorization_budget": budget, "trials": found["trials"], "pareto_trials": found["pareto"]}
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(record["new_domain_check"] | {"results": record["results"]}, indent=1))


if __name__ == "__main__":
    main()
