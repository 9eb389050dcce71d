"""MemControl (Dutt et al., WACV 2025): choose *which* parameters to fine-tune, so that fine-tuning on data
with duplicated images learns the data without memorizing the duplicates. As its code runs it
(Raman1121/Diffusion_Memorization_HPO at 5a6afdd; ``HPO`` = ``train_text_to_image_HPO.py``, ``MU`` =
``metrics_utils.py``, ``DS`` = ``get_dataset_mimic_cxr.py``):

- **search space**: one parameter-efficient family (``svdiff``, ``difffit`` or ``attention``, defined in
  :mod:`diffmem.finetune.families`), a binary mask over the UNet's transformer units for it (HPO L81-102) and
  the learning rate, log-uniform in [1e-5, 1e-3] (HPO L741-742; [5e-6, 1e-5] for ``full``, L744-745);
- **inner loop**: a fresh fine-tune of the base per trial (HPO L861-870) on the fine-tuning set, duplicates
  included, with :func:`diffmem.finetune.trainer.finetune` (AdamW, weight decay 1e-2, clipping at 1, constant
  rate, 10% caption dropout: DS L23);
- **memorization objective** (HPO L258-403, :func:`memcontrol_memorization`): over the duplicated images in
  batches of the training batch size, each noised at its own uniform timestep, the largest
  ``||eps(x_t, t, c) - eps(x_t, t, "")||_2`` of the batch, averaged over batches (one pass);
- **quality objective**: the reference computes FID with a chest-X-ray DenseNet on generated test images.
  diffmem takes the caller's offline quality loss instead (lower = better; the held-out denoising loss on
  images of the domain, :func:`diffmem.eval.quality.heldout_denoising_loss`), because no feature network
  can be downloaded here and generating FID sets per trial costs hours on a CPU;
- **sampler**: Optuna's NSGA-II, what the reference's multi-objective study got by default (HPO L1677-1688
  at d64b2c9; the HEAD commit does not parse). Below its population of 50 trials it draws at random.
- **Pareto front**: the non-dominated trials, both objectives minimised (MU L168-222), saved with every trial.

The reference does not choose a point of the front (the user passes a mask to its second stage by hand).
diffmem's stated rule, :func:`choose_point`: the front point with the lowest quality loss among those whose
memorization signal stays within ``budget_factor`` times the base model's signal on the same duplicated images
(the base never saw them, so its signal is what "not memorized" reads); if none does, the point that memorizes
least.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DiffmemError
from diffmem.finetune.dataset import FinetuneSet
from diffmem.finetune.families import make_family
from diffmem.finetune.trainer import FinetuneSettings, encode_latents, finetune, guidance_norms
from diffmem.models.model import DiffusionModel

LR_RANGE = (1e-5, 1e-3)  # HPO L741-742
FULL_LR_RANGE = (5e-6, 1e-5)  # HPO L744-745
CAPTION_DROPOUT = 0.1  # DS L23, L164-167


def memcontrol_memorization(model: DiffusionModel, data: FinetuneSet, batch: int, seed: int = 0) -> float:
    """MemControl's memorization signal on ``data`` (its duplicated images with their first captions): per batch
    of ``batch`` images, the largest text-guidance norm at one random timestep each, averaged over batches."""
    latents = encode_latents(model, data.images)
    norms = guidance_norms(model, latents, data.first_captions(), draws=1, seed=seed, batch=batch)
    return float(np.mean([norms[i:i + batch].max() for i in range(0, len(norms), batch)]))


def pareto_front(trials: list[dict[str, Any]]) -> list[int]:
    """Trial numbers of the non-dominated trials, both ``memorization`` and ``quality_loss`` minimised: sorted by
    (memorization, loss), each trial whose loss is at most the lowest seen so far (MU L168-222)."""
    best = float("inf")
    front = []
    for t in sorted(trials, key=lambda t: (t["memorization"], t["quality_loss"])):
        if t["quality_loss"] <= best:
            front.append(t["trial"])
            best = t["quality_loss"]
    return front


def choose_point(trials: list[dict[str, Any]], front: list[int], budget: float) -> dict[str, Any]:
    """diffmem's rule (module docstring): the front's lowest quality loss within the memorization budget, else the
    front point that memorizes least."""
    if not front:
        raise DiffmemError("no trials to choose from")
    points = [t for t in trials if t["trial"] in front]
    within = [t for t in points if t["memorization"] <= budget]
    if within:
        return min(within, key=lambda t: (t["quality_loss"], t["trained_share"]))
    return min(points, key=lambda t: (t["memorization"], t["quality_loss"]))


@dataclass
class MemControlSearch:
    """The bi-level search (module docstring). ``quality_loss(model)`` is the caller's (lower = better);
    ``extra(model)``, if given, adds figures to each trial's record (e.g. dev extraction)."""

    family: str = "svdiff"
    trials: int = 10  # scripts/run_HPO_svdiff1.sh L17: 10 per worker
    steps: int = 300
    batch: int = 32
    lr_range: tuple[float, float] | None = None  # None: the reference's range for the family
    caption_dropout: float = CAPTION_DROPOUT
    budget_factor: float = 1.25
    seed: int = 0
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)  # other training settings

    def trial_settings(self, lr: float, mask: dict[str, bool]) -> FinetuneSettings:
        """The fine-tuning settings of one trial (also what retrains or reloads a chosen trial)."""
        return replace(self.settings, family=self.family, mask=mask, lr=lr, steps=self.steps, batch=self.batch,
                       caption_dropout=self.caption_dropout, seed=self.seed)

    def run(self, base: DiffusionModel, data: FinetuneSet, duplicated: FinetuneSet,
            quality_loss: Callable[[DiffusionModel], float],
            extra: Callable[[DiffusionModel], dict[str, Any]] | None = None,
            keep: Callable[[int, DiffusionModel], None] | None = None, work: str | Path | None = None,
            progress: Callable[[int, int, float], None] | None = None,
            report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Search on ``data`` (duplicates included); the memorization signal reads ``duplicated``. ``keep(trial,
        model)`` sees each trained model (to report the chosen one later without retraining).

        Resumable: with ``work``, trial ``n`` trains in ``work/trialNNN`` (:func:`finetune`'s state). The sampler is
        seeded and its suggestions depend only on the trials before, so a rerun after a kill suggests the same
        trials again, and each finished one reloads from its state instead of training. ``progress`` sees each
        trial's optimiser steps, ``report`` each finished trial's record."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        family = make_family(self.family)
        units = family.maskable_units(base.unet)
        lr_range = self.lr_range or (FULL_LR_RANGE if self.family == "full" else LR_RANGE)
        base_signal = memcontrol_memorization(base, duplicated, self.batch, self.seed)
        budget = self.budget_factor * base_signal
        history: list[dict[str, Any]] = []

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            lr = trial.suggest_float("learning_rate", *lr_range, log=True)  # suggested before the mask (HPO L861)
            mask = {u: bool(trial.suggest_int(f"mask {u}", 0, 1)) for u in units} if self.family != "full" else {}
            settings = self.trial_settings(lr, mask)
            start = time.perf_counter()
            trial_work = Path(work) / f"trial{trial.number:03d}" if work is not None else None
            result = finetune(base, data, settings, work=trial_work, progress=progress)
            memorization = memcontrol_memorization(result.model, duplicated, self.batch, self.seed)
            loss = float(quality_loss(result.model))
            record = {"trial": trial.number, "learning_rate": lr, "mask": {u: int(on) for u, on in mask.items()},
                      "memorization": memorization, "quality_loss": loss,
                      "trained_parameters": result.trained_parameters,
                      "trained_share": result.trained_parameters / result.unet_parameters,
                      "final_train_loss": result.describe()["final_loss"]}
            if extra is not None:
                record |= extra(result.model)
            record["seconds"] = round(time.perf_counter() - start, 1)
            history.append(record)
            if report is not None:
                report(record)
            if keep is not None:
                keep(trial.number, result.model)
            return memorization, loss

        study = optuna.create_study(directions=["minimize", "minimize"],
                                    sampler=optuna.samplers.NSGAIISampler(seed=self.seed))
        study.optimize(objective, n_trials=self.trials)
        front = pareto_front(history)
        return {"family": self.family, "units": units, "lr_range": list(lr_range), "trials": history,
                "pareto": front, "base_memorization": base_signal, "budget": budget,
                "budget_rule": f"memorization <= {self.budget_factor} x the base model's signal on the duplicated "
                               "images", "chosen": choose_point(history, front, budget),
                "unet_parameters": sum(p.numel() for p in base.unet.parameters())}



def draw_front(ax, found: dict[str, Any], color: str = "C0", label: str = "",
               base_quality: float | None = None) -> None:
    """Draw one search (``MemControlSearch.run``'s record) on a matplotlib axis: every trial as memorization signal
    against quality loss, the Pareto front joined, the chosen trial starred, the budget dotted, and the base model
    as a cross where its quality loss is given."""
    trials, front = found["trials"], set(found["pareto"])
    ax.scatter([t["quality_loss"] for t in trials], [t["memorization"] for t in trials], color=color, alpha=0.6,
               label=f"{label}trials")
    on_front = sorted((t for t in trials if t["trial"] in front), key=lambda t: t["memorization"])
    ax.plot([t["quality_loss"] for t in on_front], [t["memorization"] for t in on_front], "-", color=color)
    chosen = found["chosen"]
    ax.plot([chosen["quality_loss"]], [chosen["memorization"]], "*", ms=14, color=color, mec="k",
            label=f"{label}picked")
    if base_quality is not None:
        ax.plot([base_quality], [found["base_memorization"]], "x", ms=9, color=color, label=f"{label}base model")
    ax.axhline(found["budget"], color=color, ls=":", lw=1)
    ax.set_xlabel("quality loss (held-out denoising loss, lower is better)")
    ax.set_ylabel("memorization signal (batch-max guidance norm)")


def save_front_plot(found: dict[str, Any], path: str | Path, base_quality: float | None = None) -> None:
    """The search's trials and Pareto front as a PNG (:func:`draw_front`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    draw_front(ax, found, base_quality=base_quality)
    ax.set_title(f"MemControl search ({found['family']}): {len(found['trials'])} trials; dotted: the pick's "
                 "budget", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
