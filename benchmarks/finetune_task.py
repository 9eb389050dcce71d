"""The fine-tuning task: learn a new domain without memorizing its duplicated images, every method side by side.

The base is the collapse zoo (``zoo:collapse``), which never saw the SD-like corpus. The fine-tuning set
(:func:`diffmem.zoo.finetune_sets.build_sd_domain_set`, a pure function of the split seed) has:

- a domain to learn: every painting/poster x colour x shape caption with ``--train-images`` independent
  images each (texture, position, size and small objects at random), plus held-out images; captions half
  dev, half test;
- a duplicated subset: ``--titles`` titles per style and copy level at 1, 4, 16 and 64 copies, one image each,
  half dev, half test; and never-trained titles of the same generator, the verdicts' null.

Per split seed and method (``diffmem.finetune`` settings; MemControl searched on dev), on the test half:

- **memorization**: each test title's ``--generations`` generations are matched (SSIM through the base's VAE)
  against its own fine-tuning image; the null of that image is the same model's generations of never-trained
  test titles matched against it; a title *replicates* when its number of matches beats its image's null
  rate, Benjamini-Hochberg at FDR 0.05 (:func:`diffmem.eval.finetune_domain.own_image_verdicts`). Reported:
  share of titles replicating, per copy level; beside it the labeller's best-match verdicts (nearest of the 16
  pixel-L2-nearest fine-tuning images plus the own one) and where never-trained titles' generations land;
- **learning**: relative drop of the held-out denoising loss on test held-out images from the base's
  (``quality_gain``), and the named-factor read-back (style, colour, shape; the SD-like zoo's attribute reader)
  of generations of the test learnt captions;
- **forgetting**: the collapse zoo's attribute read-back on 64 of its own generic captions (base: before
  fine-tuning). ``full+replay`` replays the base's generations of the zoo's *other* generic captions, never
  these 64.

Resumable: ``--work`` keeps every finished (seed, method) and every fine-tune's state.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/finetune_task.py --out benchmarks/results/finetune_task.json
    .venv/bin/python benchmarks/finetune_task.py --smoke --out /tmp/finetune_task_smoke.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.eval.finetune_domain import DomainFinetuneSet, own_image_verdicts, title_extraction, to_tensor
from diffmem.eval.quality import heldout_denoising_loss, relative_improvement
from diffmem.eval.verdicts import decide, fit_generation_null
from diffmem.finetune.dataset import FinetuneSet, concat_sets, replay_set
from diffmem.finetune.dedup import deduplicate
from diffmem.finetune.mitigations import CaptionPolicy, NoiseNormFilter
from diffmem.finetune.trainer import FinetuneSettings, finetune
from diffmem.io import atomic_write_text
from diffmem.jobs import versions
from diffmem.mitigators.memcontrol import MemControlSearch, draw_front, memcontrol_memorization
from diffmem.models import load_model
from diffmem.provenance import portable_json
from diffmem.tasks.zoo import zoo_object_fidelity
from diffmem.zoo.finetune_sets import build_sd_domain_set
from diffmem.zoo.load import load_labels, vae_roundtrip
from diffmem.zoo.paths import zoo_dir

LEVELS = (1, 4, 16, 64)
NOISE_SEEDS = {"dev": 1, "test": 2}
GEN_OFFSET = {"dev": 0, "test": 10_000}


@dataclass
class Method:
    """One row of the table: fine-tuning settings plus the data-side options."""

    settings: FinetuneSettings | None  # None: the base model, not fine-tuned
    dedup: str = "none"
    replay: bool = False
    search: str | None = None  # a MemControl family searched on dev
    from_search: str | None = None  # retrain that method's chosen trial (with this row's data options)


def methods(args: argparse.Namespace) -> dict[str, Method]:
    full = FinetuneSettings(family="full", lr=args.full_lr, steps=args.steps, batch=args.batch)
    return {
        "base": Method(None),
        "full": Method(full),
        "full+replay": Method(full, replay=True),
        "memcontrol-svdiff": Method(None, search="svdiff"),
        "memcontrol-svdiff+replay": Method(None, replay=True, from_search="memcontrol-svdiff"),
        "full+dedup": Method(full, dedup="near"),
        "full+noise-filter": Method(replace(full, noise_filter=NoiseNormFilter(quantile=0.95))),
        "full+add-tokens": Method(replace(full, caption=CaptionPolicy("add-tokens", 0.1))),
        "full+embedding-noise": Method(replace(full, embedding_noise=args.embedding_noise)),
        "lora": Method(FinetuneSettings(family="lora", lr=args.lora_lr, steps=args.steps, batch=args.batch)),
    }


@dataclass
class Setup:
    base: Any
    data: DomainFinetuneSet
    train: FinetuneSet
    index: torch.Tensor
    index_owner: list[int]
    reader: Any
    generic: list[str]  # the zoo captions whose fidelity measures forgetting
    replay_prompts: list[str]  # the zoo's other generic captions, what --replay draws
    base_loss: dict[str, float]


def prepare(args: argparse.Namespace, seed: int, base) -> Setup:
    from diffmem.zoo.sd_attributes import SDAttributeReader

    data = build_sd_domain_set(seed, args.train_images, args.heldout_images, args.titles, LEVELS,
                               null_titles_per_family=args.null_titles)
    images, owner = data.unique_training_images()
    index = vae_roundtrip(base, to_tensor(images))
    reader = SDAttributeReader.load(zoo_dir("sd") / "attribute_reader")
    generic = [r["caption"] for r in load_labels(zoo_dir("collapse")) if r["kind"] == "generic"]
    measured = generic[1::9][: args.fidelity_captions]
    replay_prompts = [c for c in generic if c not in set(measured)]  # the fidelity captions are never replayed
    setup = Setup(base, data, data.finetune_set(), index, owner.tolist(), reader, measured, replay_prompts, {})
    setup.base_loss = {s: heldout_loss(setup, base, s) for s in ("dev", "test")}
    return setup


def heldout_loss(setup: Setup, model, split: str) -> float:
    captions, images = setup.data.heldout(split)
    return float(heldout_denoising_loss(model, to_tensor(images), captions, noise_seed=NOISE_SEEDS[split]).mean())


def memorization(setup: Setup, model, split: str, k: int, steps: int) -> dict[str, Any]:
    """The split's titles' generations against the fine-tuning images (null: the split's never-trained titles).

    Headline, ``replicating``: own-image verdicts (:func:`own_image_verdicts`, ``nearest``): a title replicates
    when its generations land on *its own* image (nearest fine-tuning image) more often than never-trained
    titles' generations land on that image; ``replicating_own_ssim`` is the SSIM-threshold form of the test.
    Beside it, ``replicating_any_image``: the labeller's best-match verdicts (a generation matches when its
    nearest fine-tuning image, whichever, beats never-trained titles' best matches); and how never-trained
    titles' generations land, which shows regurgitation that no caption-level verdict can attribute."""
    data = setup.data
    titles = data.title_indices(split)
    nulls = [i for i, s in enumerate(data.null_split) if s == split]
    prompts = [data.titles[j] for j in titles for _ in range(k)]
    prompts += [data.null_titles[i] for i in nulls for _ in range(k)]
    seeds = [GEN_OFFSET[split] + g for _ in range(len(titles) + len(nulls)) for g in range(k)]
    gens = model.sample(prompts, seeds, num_inference_steps=steps).images
    owner = [j for j in titles for _ in range(k)] + [-2] * (len(nulls) * k)
    match = title_extraction(gens, owner, setup.index, setup.index_owner, threshold=1.0)
    best = np.array(match["best_ssim"])
    n_t = len(titles) * k
    levels = np.array([data.copies[j] for j in titles])
    own_images = setup.index[[setup.index_owner.index(j) for j in titles]]
    own_ssim = np.array(match["own_ssim"][:n_t], dtype=np.float64).reshape(len(titles), k)
    own_nearest = (np.array(match["best_owner"][:n_t]) == np.array(owner[:n_t])).reshape(len(titles), k)
    own = own_image_verdicts(own_ssim, own_nearest, gens[n_t:], best[n_t:], own_images)
    any_null = fit_generation_null(best[n_t:], what="never-trained titles' generations")
    anywhere = decide(best[:n_t].reshape(len(titles), k), any_null)
    null_owner = np.array(match["best_owner"][n_t:])
    copies_of = np.array([data.copies[j] if j >= 0 else 0 for j in null_owner])

    def by_level(flags: np.ndarray) -> dict[str, float]:
        return {str(lv): float(flags[levels == lv].mean()) for lv in LEVELS if (levels == lv).any()}

    return {"replicating": float(own.nearest.replicates.mean()),
            "replicating_by_copies": by_level(own.nearest.replicates),
            "own_match_share": float(own.nearest.replication_rate.mean()),
            "own_match_by_copies": by_level(own.nearest.replication_rate),
            "own_null_rate_by_copies": by_level(own.nearest_null_rate),
            "replicating_own_ssim": float(own.similar.replicates.mean()),
            "replicating_own_ssim_by_copies": by_level(own.similar.replicates),
            "replicating_any_image": float(anywhere.replicates.mean()),
            "replicating_any_image_by_copies": by_level(anywhere.replicates), "any_image_null": any_null.describe(),
            "unseen_nearest_duplicated_share": float((null_owner >= 0).mean()),
            "unseen_nearest_by_copies": {str(lv): float((copies_of == lv).mean()) for lv in LEVELS},
            "unseen_median_best_ssim": float(np.median(best[n_t:]))}


def learning(setup: Setup, model, split: str, steps: int) -> dict[str, float]:
    from diffmem.zoo.sd_attributes import shows_named

    loss = heldout_loss(setup, model, split)
    rows = [i for i, s in enumerate(setup.data.learn_split) if s == split]
    caps = [setup.data.learn_captions[i] for i in rows]
    gens = model.sample(caps, [GEN_OFFSET[split] + i for i in range(len(caps))], num_inference_steps=steps).images
    readback = shows_named(setup.reader, gens, [setup.data.learn_named[i] for i in rows])
    return {"heldout_loss": loss, "quality_gain": relative_improvement(setup.base_loss[split], loss),
            "domain_readback": float(np.mean(readback))}


def forgetting(setup: Setup, model, steps: int) -> float:
    gens = model.sample(setup.generic, list(range(len(setup.generic))), num_inference_steps=steps).images
    return zoo_object_fidelity(gens, setup.generic)


def measure(setup: Setup, model, args: argparse.Namespace) -> dict[str, Any]:
    return {"memorization": memorization(setup, model, "test", args.generations, args.sample_steps),
            "learning": learning(setup, model, "test", args.sample_steps),
            "zoo_fidelity": forgetting(setup, model, args.sample_steps)}


def run_method(setup: Setup, name: str, method: Method, args: argparse.Namespace, work: Path,
               done: dict[str, dict]) -> dict[str, Any]:
    """One row: train (or search) and measure. ``done``: this seed's finished rows (a retrained search pick reads
    its row's chosen trial)."""
    start = time.perf_counter()
    if method.search is not None:
        row = run_search(setup, method.search, args, work)
        model = trained(setup, name, method, args, work, done | {name: row})[0]
        return row | {"memcontrol_signal": signal(setup, model, args), "seconds": round(time.perf_counter() - start, 1)}
    model, result, extra = trained(setup, name, method, args, work, done)
    trained_s = time.perf_counter() - start
    row = measure(setup, model, args) | extra | {"memcontrol_signal": signal(setup, model, args)}
    if result is None:
        return row | {"trained_share": 0.0, "seconds": round(time.perf_counter() - start, 1)}
    return row | {"trained_share": result.trained_parameters / result.unet_parameters, "train": result.describe(),
                  "settings": extra.pop("settings"), "train_seconds": round(trained_s, 1),
                  "seconds": round(time.perf_counter() - start, 1)}


def signal(setup: Setup, model, args: argparse.Namespace) -> float:
    """MemControl's memorization signal (batch-max guidance norm) on the *test* duplicated titles' images."""
    return memcontrol_memorization(model, setup.data.duplicated_set("test"), args.batch, seed=0)


def trained(setup: Setup, name: str, method: Method, args: argparse.Namespace, work: Path,
            done: dict[str, dict]) -> tuple[Any, Any, dict[str, Any]]:
    """(model, fine-tuning result or None, data-side extras) of one row; a finished fine-tune reloads from its
    state in ``work`` instead of training (so a finished row's model can be measured again)."""
    if method.search is not None or method.from_search is not None:
        row = done[method.search and name or method.from_search]
        chosen = row["chosen"]
        search = MemControlSearch(family=row["search"]["family"], steps=args.steps, batch=args.batch, seed=0)
        settings = search.trial_settings(chosen["learning_rate"], {u: bool(v) for u, v in chosen["mask"].items()})
        if method.search is not None:  # the chosen trial itself, reloaded from the search's state
            result = finetune(setup.base, setup.train, settings,
                              work=work / f"memcontrol-{method.search}" / f"trial{chosen['trial']:03d}")
            return result.model, result, {"settings": settings.describe()}
        method = replace(method, settings=settings)
    if method.settings is None:
        return setup.base, None, {}
    data, extra = setup.train, {}
    if method.dedup != "none":
        data, report = deduplicate(data, method.dedup)
        extra["dedup"] = {k: v for k, v in report.describe().items() if k != "examples"}
    if method.replay:
        n = int(round(args.replay_share * len(setup.train)))
        data = concat_sets(data, replay_set(setup.base, setup.replay_prompts, n, steps=args.sample_steps))
        extra["replay_images"] = len(data) - len(setup.train)
    result = finetune(setup.base, data, method.settings, work=work / name, progress=report_progress)
    return result.model, result, extra | {"settings": method.settings.describe()}


def report_progress(step: int, steps: int, loss: float) -> None:
    """One log line every 100 optimiser steps."""
    if step % 100 == 0 or step == steps:
        print(f"  step {step}/{steps} loss {loss:.4f}", flush=True)


def run_search(setup: Setup, family: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """MemControl's search on dev (quality: the dev held-out loss), the chosen trial measured on test."""
    models: dict[int, Any] = {}
    search = MemControlSearch(family=family, trials=args.trials, steps=args.steps, batch=args.batch, seed=0)
    found = search.run(setup.base, setup.train, setup.data.duplicated_set("dev"),
                       quality_loss=lambda m: heldout_loss(setup, m, "dev"),
                       keep=lambda trial, model: models.__setitem__(trial, model), work=work / f"memcontrol-{family}",
                       progress=report_progress)
    chosen = found["chosen"]
    return measure(setup, models[chosen["trial"]], args) | {
        "trained_share": chosen["trained_share"], "search": {k: v for k, v in found.items() if k != "chosen"},
        "chosen": chosen}


def summarise(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Mean over seeds of the headline figures of each method."""
    keys = {"replicating": ("memorization", "replicating"), "own_match_share": ("memorization", "own_match_share"),
            "replicating_own_ssim": ("memorization", "replicating_own_ssim"),
            "replicating_any_image": ("memorization", "replicating_any_image"),
            "unseen_nearest_duplicated_share": ("memorization", "unseen_nearest_duplicated_share"),
            "quality_gain": ("learning", "quality_gain"), "domain_readback": ("learning", "domain_readback"),
            "zoo_fidelity": ("zoo_fidelity",), "trained_share": ("trained_share",),
            "memcontrol_signal": ("memcontrol_signal",)}
    out: dict[str, dict[str, float]] = {}
    names = dict.fromkeys(n for per_seed in runs.values() for n in per_seed)
    for name in names:
        rows = [per_seed[name] for per_seed in runs.values() if name in per_seed]
        row: dict[str, Any] = {"seeds": len(rows)}
        for key, path in keys.items():
            vals = []
            for r in rows:
                v = r
                for p in path:
                    v = v[p]
                vals.append(float(v))
            row[key] = float(np.mean(vals))
            row[f"{key}_per_seed"] = vals
        for lv in LEVELS:
            row[f"replicating_{lv}x"] = float(np.mean([r["memorization"]["replicating_by_copies"][str(lv)]
                                                       for r in rows]))
        out[name] = row
    return out


def plot(record: dict[str, Any], path: Path) -> None:
    """Left: each method's share of test titles replicating against its held-out loss gain (mean over split
    seeds; colour: the zoo's own captions' fidelity). Right: MemControl's trials on dev, memorization signal
    against dev held-out loss, the Pareto front joined, the picked trial starred, the base model as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = record["results"]
    gain = [r["quality_gain"] for r in results.values()]
    rep = [r["replicating"] for r in results.values()]
    points = ax1.scatter(gain, rep, c=[r["zoo_fidelity"] for r in results.values()], cmap="viridis", vmin=0,
                         vmax=1, s=40, zorder=3)
    for i, (name, x, y) in enumerate(zip(results, gain, rep)):  # staggered: rows can share a point
        ax1.annotate(name, (x, y), fontsize=7, xytext=(-60 if x > 0.55 else 4, (3, 11, -9)[i % 3]),
                     textcoords="offset points")
    fig.colorbar(points, ax=ax1, label="zoo captions' fidelity (forgetting)")
    ax1.set_xlabel("held-out denoising loss gain over the base (learning)")
    ax1.set_ylabel("test titles replicating, FDR 0.05")
    ax1.set_title("methods, test half, mean of split seeds", fontsize=9)
    for i, (seed, per_method) in enumerate(sorted(record["runs"].items(), key=lambda kv: int(kv[0]))):
        run = per_method.get("memcontrol-svdiff")
        if run is None:
            continue
        draw_front(ax2, run["search"] | {"chosen": run["chosen"]}, color=f"C{i}", label=f"seed {seed}: ",
                   base_quality=record["sets"][seed]["base_heldout_loss"]["dev"])
    ax2.set_xlabel("dev held-out denoising loss (quality, lower is better)")
    ax2.set_title("MemControl search (SV-Diff), dev half; dotted: the pick's budget", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/finetune_task.json")
    p.add_argument("--work", default="runs/finetune_task")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline, not the figures")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=None, help="default: every method")
    p.add_argument("--steps", type=int, default=1500,
                   help="optimiser steps per fine-tune (default 1500: at 1000 full fine-tuning matched its own image "
                        "in 19-25%% of 16x/64x title generations, at 1500 in 31-44%%; lr 1e-3 was no faster)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--full-lr", type=float, default=4e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--embedding-noise", type=float, default=0.1)
    p.add_argument("--replay-share", type=float, default=0.25)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--merge", nargs="*", default=[], metavar="WORK",
                   help="other --work folders of this task (e.g. methods run in a second process) whose finished "
                        "(seed, method) runs are taken into this record")
    p.add_argument("--train-images", type=int, default=8)
    p.add_argument("--heldout-images", type=int, default=2)
    p.add_argument("--titles", type=int, default=4, help="titles per style and copy level (half dev)")
    p.add_argument("--null-titles", type=int, default=32, help="never-trained titles per style (half dev)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--fidelity-captions", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--plot", action="store_true", help="only redraw the figure (OUT with .png) from --out")
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.plot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    if args.smoke:
        args.steps, args.batch, args.trials, args.train_images, args.heldout_images = 2, 4, 2, 1, 1
        args.titles, args.null_titles, args.generations, args.fidelity_captions = 2, 50, 2, 4
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"runs": {}}
    for other in args.merge:
        for seed, per_method in json.loads((Path(other) / "record.json").read_text())["runs"].items():
            for name, result in per_method.items():
                record["runs"].setdefault(seed, {}).setdefault(name, result)
    base = load_model("zoo:collapse")
    table = methods(args)
    names = args.methods or list(table)
    record |= {"benchmark": "finetune_task", "model": base.describe(), "settings": vars(args), "levels": list(LEVELS),
               "versions": versions()}
    for seed in args.seeds:
        setup = prepare(args, seed, base)
        record.setdefault("sets", {})[str(seed)] = setup.data.summary() | {"base_heldout_loss": setup.base_loss}
        runs = record["runs"].setdefault(str(seed), {})
        for name in names:
            if name in runs and "memcontrol_signal" not in runs[name]:  # rows finished before it was measured
                model = trained(setup, name, table[name], args, work / f"seed{seed}", runs)[0]
                runs[name]["memcontrol_signal"] = signal(setup, model, args)
                atomic_write_text(record_path, json.dumps(record, indent=1, default=str))
            if name in runs:
                continue
            print(f"seed {seed}: {name}", flush=True)
            if table[name].from_search is not None and table[name].from_search not in runs:
                print(f"seed {seed}: {name} skipped: {table[name].from_search} has not run", flush=True)
                continue
            runs[name] = run_method(setup, name, table[name], args, work / f"seed{seed}", runs)
            record["results"] = summarise(record["runs"])
            atomic_write_text(record_path, json.dumps(record, indent=1, default=str))
    record["results"] = summarise(record["runs"])
    atomic_write_text(record_path, json.dumps(record, indent=1, default=str))
    atomic_write_text(Path(args.out), portable_json(record))
    plot(record, Path(args.out).with_suffix(".png"))
    print(json.dumps(record["results"], indent=1))


if __name__ == "__main__":
    main()
