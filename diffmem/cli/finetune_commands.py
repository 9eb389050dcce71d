"""``diffmem finetune``: fine-tune a checkpoint on an image-caption folder, with the training-time mitigations."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.cli.options import add_force, add_model_args, handled_by, positive_int
from diffmem.errors import DiffmemError

RECORD = "finetune.json"
FRONT_PLOT = "memcontrol_front.png"  # with --search: the trials and the Pareto front
STATE_DIR = "finetune-state"  # inside --out while the run is under way; removed when the checkpoint is written
FAMILY_HELP = ("full (every UNet weight) | attention (MemControl: the transformer units' weights, directly) | "
               "svdiff (MemControl: spectral shifts of every weight) | difffit (MemControl: biases, norms, scale "
               "factors) | lora (diffmem's variant: LoRA on the units' attention projections)")


def register(sub: argparse._SubParsersAction) -> None:
    p = handled_by(sub.add_parser("finetune", help="fine-tune a checkpoint on an image-caption folder without "
                                                  "memorizing it: PEFT families with a block mask, caption "
                                                  "mitigations, the noise-norm filter, deduplication"),
                   "diffmem.cli.finetune_commands:run_finetune")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="image-caption folder: metadata.jsonl (file_name, text: a caption or a list) or a .txt "
                        "beside each image (one caption per line)")
    p.add_argument("--out", required=True,
                   help="new checkpoint folder (never the input); a killed run resumes from it")
    add_force(p)
    p.add_argument("--family", default=None,
                   help=f"what trains: {FAMILY_HELP} (default: full; svdiff with --search, MemControl's default)")
    p.add_argument("--mask", nargs="+", default=None, metavar="UNIT=0|1",
                   help="block mask over transformer units, e.g. down_blocks.0.attentions.0=0 (units not named stay "
                        "on; default: all on)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate, constant (default: 1e-5)")
    p.add_argument("--steps", type=positive_int, default=200, help="optimiser steps (default: 200)")
    p.add_argument("--batch", type=positive_int, default=8, help="images per step (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of captions replaced by the empty prompt (MemControl trains with 0.1; default: 0)")
    p.add_argument("--captions", default="first",
                   choices=("first", "multi", "replace", "add-tokens", "repeat-words"),
                   help="Somepalli et al.'s caption mitigation: multi (a random one of an image's captions), "
                        "replace (4 random tokens), add-tokens (2 random tokens inserted), repeat-words (2 of its "
                        "words repeated); default: first (the first caption, no mitigation)")
    p.add_argument("--caption-prob", type=float, default=0.1,
                   help="probability of replace / add-tokens / repeat-words per sample (default: 0.1, DCR's)")
    p.add_argument("--embedding-noise", type=float, default=0.0,
                   help="std of Gaussian noise added to the text embeddings while training (default: 0, off)")
    p.add_argument("--noise-filter", default=None, metavar="q=Q|threshold=T",
                   help="Wen et al.'s filter: drop samples whose text-guidance norm reaches a threshold, "
                        "calibrated as quantile Q of the base model's norms on --data (e.g. q=0.95) or given "
                        "(threshold=2 is Wen's constant on SD v1.4; default: off)")
    p.add_argument("--dedup", default="none", choices=("none", "exact", "near"),
                   help="drop duplicate images before training, merging their captions: exact pixels, or "
                        "perceptual-hash neighbours too (default: none)")
    p.add_argument("--dedup-distance", type=int, default=4,
                   help="near duplicates: at most this many differing bits of the 64-bit pHash (default: 4)")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="prompts whose generations by the input model join the training set, so the model keeps "
                        "drawing them (retention without the original training data; default: none)")
    p.add_argument("--replay-share", type=float, default=0.25,
                   help="replay images as a share of the fine-tuning set's size (default: 0.25)")
    p.add_argument("--checkpoint-every", type=positive_int, default=25,
                   help="steps between saved training states (default: 25)")
    search = p.add_argument_group("MemControl's search (--search memcontrol): which units to train and the "
                                  "learning rate, chosen for learning without memorizing")
    search.add_argument("--search", default=None, choices=("memcontrol",),
                        help="search block masks and the learning rate (log-uniform in the reference's range; --lr "
                             "and --mask are then searched, not given) and write the chosen trial's checkpoint "
                             "(default: none, no search)")
    search.add_argument("--trials", type=positive_int, default=10,
                        help="fine-tunes the search runs (default: 10, the reference's per worker)")
    search.add_argument("--heldout", default=None, metavar="DIR",
                        help="image-caption folder of the domain the model does not train on: the quality term "
                             "is the held-out denoising loss on it (required with --search; default: none)")
    search.add_argument("--memorization-data", default=None, metavar="DIR",
                        help="image-caption folder the memorization signal reads (default: one image of each "
                             "near-duplicate group in --data; all of --data if it has none)")
    search.add_argument("--budget-factor", type=float, default=1.25,
                        help="the pick: the front's lowest held-out loss whose memorization signal is at most "
                             "this times the input model's (default: 1.25)")


def _mask(items: list[str] | None) -> dict[str, bool]:
    mask = {}
    for item in items or []:
        unit, sep, value = item.partition("=")
        if not sep or value not in ("0", "1"):
            raise DiffmemError(f"--mask '{item}': expected UNIT=0 or UNIT=1, e.g. down_blocks.0.attentions.0=0")
        mask[unit] = value == "1"
    return mask


def _noise_filter(text: str | None):
    from diffmem.finetune.mitigations import NoiseNormFilter

    if text is None:
        return None
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or key not in ("q", "threshold") or number is None:
        raise DiffmemError(f"--noise-filter '{text}': expected q=Q (a quantile in (0, 1)) or threshold=T (> 0)")
    return NoiseNormFilter(quantile=number) if key == "q" else NoiseNormFilter(threshold=number)


def run_finetune(args: argparse.Namespace) -> None:
    import shutil

    from tqdm import tqdm

    from diffmem.cli.options import resolve_device
    from diffmem.finetune.dataset import check_finetune_folder
    from diffmem.finetune.dedup import deduplicate
    from diffmem.finetune.families import FAMILIES, check_mask
    from diffmem.finetune.mitigations import CaptionPolicy
    from diffmem.finetune.trainer import FinetuneSettings, finetune
    from diffmem.jobs import versions
    from diffmem.models.checkpoint import write_checkpoint
    from diffmem.models.loader import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir

    # every input checked before the model loads; the checkpoint is written only when training is complete
    device = resolve_device(args.device)
    args.family = args.family or ("svdiff" if args.search else "full")
    if args.family not in FAMILIES:
        raise DiffmemError(f"--family '{args.family}': expected one of {', '.join(FAMILIES.names())}")
    settings = FinetuneSettings(family=args.family, mask=_mask(args.mask), lr=args.lr, steps=args.steps,
                                batch=args.batch, seed=args.seed, caption_dropout=args.caption_dropout,
                                checkpoint_every=args.checkpoint_every,
                                caption=CaptionPolicy(args.captions, args.caption_prob),
                                embedding_noise=args.embedding_noise, noise_filter=_noise_filter(args.noise_filter))
    writes = [RECORD, STATE_DIR] + ([FRONT_PLOT] if args.search else [])
    check_output_dir(args.out, "finetune", [args.model, args.data], args.force, writes=writes)
    raw = check_finetune_folder(args.data)
    heldout_raw, memorization_raw = _check_search_inputs(args)
    replay_prompts = None
    if args.replay is not None:
        from diffmem.prompts import load_prompts

        if not 0 < args.replay_share <= 10:
            raise DiffmemError(f"--replay-share must be in (0, 10]; got {args.replay_share}")
        replay_prompts = load_prompts(args.replay).texts
    model = load_model(args.model, device=device, dtype=args.dtype or "float32", config=args.config)
    check_mask(model.unet, settings.mask)  # before anything is written
    resolution = model.latent_shape[-1] * (2 ** (len(model.vae.config.block_out_channels) - 1) if model.vae else 1)
    data = raw.at(resolution)
    dedup = None
    if args.dedup != "none":
        data, report = deduplicate(data, args.dedup, args.dedup_distance)
        dedup = report.describe()
        print(f"dedup ({args.dedup}): {report.removed()} duplicate image(s) in {len(report.groups)} group(s) dropped, "
              f"{len(data)} left")
    replay = None
    if replay_prompts is not None:
        from diffmem.finetune.dataset import concat_sets, replay_set

        prompts = replay_prompts
        n = max(1, int(round(args.replay_share * len(data))))
        data = concat_sets(data, replay_set(model, prompts, n, seed=args.seed + 50_000))
        replay = {"prompts": len(prompts), "images": n, "source": str(args.replay)}
        print(f"replay: {n} generations of {len(prompts)} prompt(s) by the input model added")
    out = claim_output_dir(args.out, "finetune", writes)
    bar = tqdm(total=settings.steps, desc="finetune", unit="step", disable=args.quiet)

    def progress(step: int, total: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    search_record = None
    if args.search:
        settings, search_record = _memcontrol_search(args, model, data, settings, heldout_raw.at(resolution),
                                                     memorization_raw.at(resolution) if memorization_raw else None,
                                                     out / STATE_DIR, progress, bar)
        bar.reset(total=settings.steps)
    result = finetune(model, data, settings, work=_chosen_work(out, search_record), progress=progress)
    bar.close()
    record = {"settings": settings.describe(), "data": data.describe(), "dedup": dedup, "replay": replay,
              "search": search_record, "result": result.describe(),
              "input_model": model.describe(), "versions": versions()}
    write_checkpoint(out, model, {"unet": result.model.unet}, "finetune", RECORD, record, args.force)
    if search_record is not None:
        from diffmem.mitigators.memcontrol import save_front_plot

        save_front_plot(search_record, out / FRONT_PLOT, base_quality=search_record["base_quality_loss"])
        print(_search_summary(search_record))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # ours, and done with
    summary = result.describe()
    print(f"finetune: {settings.family}, {summary['trained_parameters']} of {summary['unet_parameters']} UNet "
          f"parameters trained ({100 * summary['trained_share']:.3f}%), {summary['steps']} steps, final loss "
          f"{summary['final_loss']:.4f}; checkpoint written to {out}")
    print(f"check what it reproduces: `diffmem extract --model {out} --prompts <its training captions> --train-index "
          f"{Path(args.data)} --null-prompts <captions it never saw>` (verdicts at a stated error rate)")


def _check_search_inputs(args: argparse.Namespace):
    """The search's folders, checked before the model loads: (held-out set, memorization set or None)."""
    from diffmem.finetune.dataset import check_finetune_folder

    if not args.search:
        for flag, value in (("--heldout", args.heldout), ("--memorization-data", args.memorization_data)):
            if value is not None:
                raise DiffmemError(f"{flag} is read by the search only; add --search memcontrol or leave it out")
        return None, None
    if args.mask:
        raise DiffmemError("--mask with --search: the search chooses the mask; leave --mask out")
    if args.heldout is None:
        raise DiffmemError("--search memcontrol needs --heldout DIR: images of the domain the model does not train "
                           "on, whose denoising loss is the search's quality term")
    if not args.budget_factor > 0:
        raise DiffmemError(f"--budget-factor must be > 0; got {args.budget_factor}")
    heldout = check_finetune_folder(args.heldout)
    memorization = check_finetune_folder(args.memorization_data) if args.memorization_data else None
    return heldout, memorization


def _memcontrol_search(args, model, data, settings, heldout, memorization, work: Path, progress, bar):
    """Run MemControl's search (resumable in ``work``); returns the chosen trial's settings and the record."""
    from diffmem.eval.quality import heldout_denoising_loss
    from diffmem.finetune.dedup import find_duplicates
    from diffmem.mitigators.memcontrol import MemControlSearch

    source = "--memorization-data"
    if memorization is None:
        groups, _, _ = find_duplicates(data, "near", args.dedup_distance)
        memorization = data.take([g[0] for g in groups]) if groups else data
        source = f"{len(groups)} near-duplicate group(s) of --data" if groups else "all of --data (no duplicates)"
    captions = heldout.first_captions()

    def quality(m) -> float:
        return float(heldout_denoising_loss(m, heldout.images, captions, noise_seed=args.seed).mean())

    search = MemControlSearch(family=settings.family, trials=args.trials, steps=settings.steps, batch=settings.batch,
                              budget_factor=args.budget_factor, seed=args.seed, settings=settings)

    def report(trial: dict) -> None:
        bar.write(f"trial {trial['trial']}: lr {trial['learning_rate']:.2e}, {sum(trial['mask'].values())} of "
                  f"{len(trial['mask'])} units, memorization {trial['memorization']:.3f}, held-out loss "
                  f"{trial['quality_loss']:.4f}")
        bar.reset(total=settings.steps)

    found = search.run(model, data, memorization, quality_loss=quality, work=work, progress=progress,
                       report=report)
    chosen = found["chosen"]
    found |= {"memorization_data": source, "memorization_images": len(memorization), "heldout_images": len(heldout),
              "base_quality_loss": quality(model)}
    return search.trial_settings(chosen["learning_rate"], {u: bool(v) for u, v in chosen["mask"].items()}), found


def _chosen_work(out: Path, search_record: dict | None) -> Path:
    """Where the final fine-tune keeps its state: the chosen trial's, so it reloads instead of training again."""
    if search_record is None:
        return out / STATE_DIR
    return out / STATE_DIR / f"trial{search_record['chosen']['trial']:03d}"


def _search_summary(found: dict) -> str:
    chosen = found["chosen"]
    return (f"search: {len(found['trials'])} trials, {len(found['pareto'])} on the Pareto front; picked trial "
            f"{chosen['trial']} (lr {chosen['learning_rate']:.2e}, memorization {chosen['memorization']:.3f} vs the "
            f"input's {found['base_memorization']:.3f}, budget {found['budget']:.3f}; held-out loss "
            f"{chosen['quality_loss']:.4f} vs the input's {found['base_quality_loss']:.4f})")
