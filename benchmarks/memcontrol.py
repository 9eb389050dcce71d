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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """The fine-tuning examples as VAE latents and prompt embeddings (what :func:`finetune` trains on)."""
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


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (``--smoke`` shrinks them in :func:`apply_smoke`)."""
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
    return parser


def apply_smoke(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--smoke``, tiny sizes that exercise every step of the pipeline in little time (figures meaningless)."""
    if args.smoke:
        args.trials, args.steps, args.batch, args.copies = 2, 3, 8, 4
        args.titles_per_family, args.train_images, args.heldout_images = 2, 2, 1
        args.generations, args.fidelity_captions = 2, 8
    return args


@dataclass
class Setup:
    """Everything the variants are trained and judged on, built once from the base model and the options."""

    args: argparse.Namespace
    base: Any  # the zoo model every variant starts from
    blocks: list[str]  # the UNet's transformer blocks
    total: int  # UNet parameters
    data_set: DomainFinetuneSet
    data: FinetuneData  # the fine-tuning set, encoded
    index: torch.Tensor  # every unique fine-tuning image through the VAE (the extraction index)
    index_owner: np.ndarray  # the fine-tuning caption of each index image
    threshold: float  # the zoo's scene SSIM threshold: a match above it is a copy
    independent: torch.Tensor  # SSIM of two independent images of each learnt caption (through the VAE)
    heldout: dict  # split -> (captions, held-out images)
    heldout_x: dict[str, torch.Tensor]  # split -> the held-out images as a tensor
    generic: list[str]  # the collapse zoo's generic captions the fidelity is read on
    seconds: float  # wall-clock of the setup, model load included


def prepare(args: argparse.Namespace, t0: float) -> Setup:
    """Load the base, build and encode the fine-tuning set, its extraction index, held-out halves and fidelity
    captions (``t0``: when the run started, for the setup's seconds)."""
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
    return Setup(args, base, blocks, total, data_set, data, index, index_owner, threshold, independent, heldout,
                 heldout_x, generic, time.perf_counter() - t0)


def heldout_loss(setup: Setup, model, split: str) -> float:
    """``model``'s mean held-out denoising loss on one half's held-out images, with that half's noise seed."""
    return float(heldout_denoising_loss(model, setup.heldout_x[split], setup.heldout[split][0],
                                        noise_seed=NOISE_SEEDS[split]).mean())


def dev_title_captions(setup: Setup) -> list[str]:
    """The duplicated titles of the dev half (what the search's noise-norm signal reads)."""
    return [setup.data_set.titles[j] for j in setup.data_set.title_indices("dev")]


def extraction(setup: Setup, model, split: str) -> dict:
    """:func:`title_extraction` of one half's titles, ``--generations`` each from that half's seeds."""
    titles = setup.data_set.title_indices(split)
    generations = setup.args.generations
    owner = [j for j in titles for _ in range(generations)]
    seeds = [GEN_SEED_OFFSET[split] + g for _ in titles for g in range(generations)]
    gens = model.sample([setup.data_set.titles[j] for j in owner], seeds, num_inference_steps=20).images
    return title_extraction(gens, owner, setup.index, setup.index_owner.tolist(), setup.threshold)


def evaluate_dev(setup: Setup, base_loss: dict[str, float], model) -> dict[str, float]:
    """What the search sees: dev titles, dev held-out images, dev seeds."""
    loss = heldout_loss(setup, model, "dev")
    ext = extraction(setup, model, "dev")
    nn_ = noise_norm_memorization(model, dev_title_captions(setup))
    mem = ext["share"] if setup.args.search_signal == "extraction" else nn_
    return {"memorization": mem, "quality": relative_improvement(base_loss["dev"], loss),
            "dev_loss": loss, "dev_extraction": ext["share"], "dev_noise_norm": nn_}


def report(setup: Setup, base_loss: dict[str, float], model) -> dict:
    """Every reported figure: test titles, test held-out images, test seeds; zoo fidelity."""
    loss = heldout_loss(setup, model, "test")
    ext = extraction(setup, model, "test")
    gen = model.sample(setup.generic, list(range(len(setup.generic))), num_inference_steps=20).images
    return {"extraction": ext["share"], "own_ssim_mean": round(float(np.mean(ext["own_ssim"])), 4),
            "new_domain_loss": round(loss, 5),
            "new_domain_quality_gain": round(relative_improvement(base_loss["test"], loss), 4),
            "fidelity": zoo_object_fidelity(gen, setup.generic)}


def threshold_record(setup: Setup) -> dict:
    """The extraction threshold, where it comes from, and how independent images of a learnt caption compare."""
    independent = setup.independent
    return {"ssim": setup.threshold, "source": "zoo.json labels.thresholds.scene (independent "
            "renders of the zoo's scene captions)",
            "new_domain_independent_ssim": {
                "n": len(independent),
                "p99": round(float(independent.quantile(0.99)), 4) if len(independent) else None,
                "max": round(float(independent.max()), 4) if len(independent) else None}}


def initial_record(setup: Setup, base_loss: dict[str, float], base_noise_norm: float) -> dict:
    """The record before any variant is run: model, set, protocol, threshold, quality term, the new-domain check
    (the base's loss on the new domain against its own), blocks and search settings."""
    args, base = setup.args, setup.base
    record: dict = {
        "benchmark": "memcontrol", "model": base.describe(), "smoke": args.smoke,
        "fine_tune_set": setup.data_set.summary() | {"steps": args.steps, "batch": args.batch},
        "protocol": {"search_sees": "dev titles, dev held-out images, dev generation seeds, dev noise seed",
                     "reported": "test titles, test held-out images, test generation seeds, test noise seed; "
                                 "zoo fidelity on generic captions[1::9]",
                     "tuned_on_dev": "MemControl's block mask and learning rate",
                     "not_tuned": f"baseline learning rates (full {args.full_lr}, LoRA {args.lora_lr}), steps, rank"},
        "extraction_threshold": threshold_record(setup),
        "quality_term": {"name": "held-out denoising loss (epsilon MSE)", "timesteps": list(HELDOUT_TIMESTEPS),
                         "noise_seeds": NOISE_SEEDS, "gain": "(base - model) / base"},
        "new_domain_check": {"base_new_domain_loss": {s: round(v, 5) for s, v in base_loss.items()},
                             "base_zoo_domain_loss": round(zoo_domain_loss(base, max(16, len(setup.heldout_x["test"])),
                                                                           NOISE_SEEDS["test"]), 5)},
        "blocks": setup.blocks, "search": {"signal": args.search_signal, "lr_range": list(args.lr_range),
                                           "base_dev_noise_norm": base_noise_norm},
        "setup_seconds": round(setup.seconds, 1), "results": {}}
    check = record["new_domain_check"]
    check["base_loss_ratio_new_over_zoo"] = round(base_loss["test"] / check["base_zoo_domain_loss"], 3)
    return record


def run_baselines(setup: Setup, base_loss: dict[str, float], record: dict, save: Callable[[], None]) -> None:
    """The base model, full fine-tuning and LoRA on every block (fixed learning rates), each saved as it ends."""
    args = setup.args
    start = time.perf_counter()
    record["results"]["base"] = report(setup, base_loss, setup.base) | {
        "tuned_fraction": 0.0, "seconds": round(time.perf_counter() - start, 1)}
    save()
    for name, family, lr in [("full-finetune", "full", args.full_lr), ("lora-all-blocks", "attention", args.lora_lr)]:
        start = time.perf_counter()
        model, n = finetune(setup.base, setup.data, family, setup.blocks, lr, args.steps, args.batch, 4, 0)
        train_s = time.perf_counter() - start
        record["results"][name] = report(setup, base_loss, model) | {"tuned_fraction": n / setup.total, "lr": lr,
                                                                     "train_seconds": round(train_s, 1),
                                                                     "seconds": round(time.perf_counter() - start, 1)}
        save()
        del model


def run_search(setup: Setup, base_loss: dict[str, float], base_noise_norm: float, record: dict) -> None:
    """MemControl's search on dev figures (budget by ``--search-signal``), its chosen trial reported on test."""
    args = setup.args
    budget = args.budget if args.search_signal == "extraction" else args.noise_norm_factor * base_noise_norm
    trained: list = []

    def evaluate_and_keep(model) -> dict[str, float]:
        trained.append(model)
        return evaluate_dev(setup, base_loss, model)

    start = time.perf_counter()
    search = MemControlSearch(family="attention", trials=args.trials, steps=args.steps, batch=args.batch,
                              lr_range=tuple(args.lr_range), memorization_budget=budget)
    found = search.run(setup.base, setup.data, evaluate_and_keep)
    search_s = time.perf_counter() - start
    chosen = found["chosen"]
    record["results"]["memcontrol"] = report(setup, base_loss, trained[chosen["trial"]]) | {
        "tuned_fraction": chosen["tuned_fraction"], "lr": chosen["lr"], "blocks": chosen["blocks"],
        "trial": chosen["trial"], "search_seconds": round(search_s, 1),
        "seconds": round(time.perf_counter() - start, 1)}
    record["search"] |= {"memorization_budget": budget, "trials": found["trials"], "pareto_trials": found["pareto"]}


def main() -> None:
    args = apply_smoke(build_parser().parse_args())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    setup = prepare(args, t0)
    base_loss = {s: heldout_loss(setup, setup.base, s) for s in SPLITS}
    base_noise_norm = noise_norm_memorization(setup.base, dev_title_captions(setup))
    record = initial_record(setup, base_loss, base_noise_norm)
    out = Path(args.out)

    def save() -> None:
        atomic_write_text(out, portable_json(record))

    run_baselines(setup, base_loss, record, save)
    run_search(setup, base_loss, base_noise_norm, record)
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(json.dumps(record["new_domain_check"] | {"results": record["results"]}, indent=1))


if __name__ == "__main__":
    main()
