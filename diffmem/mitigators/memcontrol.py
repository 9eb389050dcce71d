"""MemControl (Dutt et al., WACV 2025): choose *which* parameters to fine-tune so that fine-tuning on
data with duplicated items learns the data without memorizing the duplicates.

Setting: a base model is fine-tuned on new data in which a subset is repeated many times. The search
space is a per-block on/off mask over the UNet's transformer blocks (down, mid, up) for one
parameter-efficient family, plus the learning rate:

- ``attention``: LoRA (peft, rank ``lora_rank``) on the attention projections of the selected blocks;
- ``bias-norm``: biases and normalisation weights of the selected blocks.

Bi-level search, as the paper frames it: the outer loop (Optuna, multi-objective TPE) proposes a mask
and learning rate; the inner loop fine-tunes for ``steps`` steps and the caller's ``evaluate`` returns
two rewards, a **memorization** term on the duplicated subset (lower is better; the paper uses the
first-step noise norm, :func:`noise_norm_memorization`; an extraction share works too) and a
**quality** term (higher is better; the paper uses FID; on a fine-tuning set with a new domain, the
relative drop of the held-out denoising loss, :func:`diffmem.eval.quality.heldout_denoising_loss`).

Which Pareto point to ship is this module's rule, :func:`select_trial`: the trial that learns most
among those whose memorization stays within ``memorization_budget``; if none does, the trial that
memorizes least. A trial that learns without memorizing therefore always outranks one that learns
more by memorizing, and among non-memorizing trials the one that changed the model least does not win
by default (the failure of a quality term that only measures preservation).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.errors import DiffmemError
from diffmem.models.model import DiffusionModel
from diffmem.scan import score_chunk

BLOCK_PATTERN = re.compile(r"^((down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)$")


def transformer_blocks(unet: nn.Module) -> list[str]:
    """Names of the UNet's transformer blocks (cross-attention stacks), in module order."""
    names = [n for n, _ in unet.named_modules() if BLOCK_PATTERN.match(n)]
    if not names:
        raise DiffmemError("the UNet has no transformer blocks (down/mid/up *.attentions.*) to select from")
    return names


@dataclass
class FinetuneData:
    """Latents and caption embeddings to fine-tune on (duplicates already repeated)."""

    latents: torch.Tensor
    embeddings: torch.Tensor


def trainable_parameters(model: DiffusionModel, family: str, blocks: list[str], lora_rank: int
                         ) -> list[nn.Parameter]:
    """Switch on the parameters of ``family`` inside ``blocks`` (all blocks for the full model: 'full')."""
    unet = model.unet
    unet.requires_grad_(False)
    if family == "full":
        unet.requires_grad_(True)
        return list(unet.parameters())
    if family == "attention":
        from peft import LoraConfig

        targets = [f"{b}.{rest}" for b in blocks for rest, _ in dict(unet.get_submodule(b).named_modules()).items()
                   if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", rest)]
        if not targets:
            raise DiffmemError(f"no attention projections in blocks {blocks}")
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=targets))
        return [p for p in unet.parameters() if p.requires_grad]
    if family == "bias-norm":
        params = []
        for b in blocks:
            for name, p in unet.get_submodule(b).named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.requires_grad_(True)
                    params.append(p)
        return params
    raise DiffmemError(f"unknown PEFT family {family!r}; expected full, attention or bias-norm")


def finetune(base: DiffusionModel, data: FinetuneData, family: str, blocks: list[str], lr: float, steps: int,
             batch: int, lora_rank: int, seed: int) -> tuple[DiffusionModel, int]:
    """A fine-tuned copy of ``base`` and the number of parameters it tuned."""
    from diffmem.mitigators.adversarial_finetune import denoising_loss
    from diffmem.mitigators.base import clone_model

    model = clone_model(base)
    params = trainable_parameters(model, family, blocks, lora_rank)
    n_tuned = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.unet.train()
    for _ in range(steps):
        idx = torch.randint(len(data.latents), (batch,), generator=g)
        with torch.enable_grad():
            loss = denoising_loss(model, data.latents[idx], data.embeddings[idx], 1, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    model.unet.eval()
    if family == "attention":
        model.unet.fuse_lora()
        model.unet.unload_lora()
    model.unet.requires_grad_(False)
    return model, n_tuned


def as_scores(result: tuple[float, float] | Mapping[str, float]) -> dict[str, float]:
    """An ``evaluate`` result as a dict with ``memorization`` and ``quality`` (plus any extra figures)."""
    if isinstance(result, Mapping):
        missing = {"memorization", "quality"} - set(result)
        if missing:
            raise DiffmemError(f"evaluate() must return 'memorization' and 'quality'; missing {sorted(missing)}")
        return {k: float(v) for k, v in result.items()}
    memorization, quality = result
    return {"memorization": float(memorization), "quality": float(quality)}


def trial_rank(trial: Mapping[str, Any], memorization_budget: float) -> tuple[int, float, float]:
    """Sort key of :func:`select_trial` (smaller ranks first).

    Within the budget: more quality first, then fewer tuned parameters. Over the budget: always after
    every trial within it, less memorization first.
    """
    tuned = float(trial.get("tuned_fraction", 0.0))
    if trial["memorization"] <= memorization_budget:
        return (0, -float(trial["quality"]), tuned)
    return (1, float(trial["memorization"]), -float(trial["quality"]))


def select_trial(history: list[dict[str, Any]], memorization_budget: float) -> dict[str, Any]:
    """The trial to ship: best quality with memorization <= ``memorization_budget``, else least memorization."""
    if not history:
        raise DiffmemError("no trials to select from")
    return min(history, key=lambda h: trial_rank(h, memorization_budget))


@dataclass
class MemControlSearch:
    """The bi-level search; ``evaluate(model)`` is supplied by the caller and returns
    ``(memorization, quality)`` or a dict with those keys (extra keys are recorded with the trial).

    ``memorization_budget`` is in the unit of the caller's memorization term (a share of extracted
    generations: 0.05 is the issue's 5% target).
    """

    family: str = "attention"
    trials: int = 8
    steps: int = 150
    batch: int = 32
    lora_rank: int = 4
    lr_range: tuple[float, float] = (1e-4, 3e-3)
    memorization_budget: float = 0.05
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def run(self, base: DiffusionModel, data: FinetuneData,
            evaluate: Callable[[DiffusionModel], tuple[float, float] | Mapping[str, float]]) -> dict[str, Any]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        blocks = transformer_blocks(base.unet)
        total = sum(p.numel() for p in base.unet.parameters())

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            mask = [trial.suggest_categorical(b, [False, True]) for b in blocks]
            chosen = [b for b, on in zip(blocks, mask) if on] or [blocks[-1]]
            lr = trial.suggest_float("lr", *self.lr_range, log=True)
            start = time.perf_counter()
            model, n = finetune(base, data, self.family, chosen, lr, self.steps, self.batch, self.lora_rank,
                                self.seed)
            scores = as_scores(evaluate(model))
            self.history.append({"trial": trial.number, "blocks": chosen, "lr": lr, **scores,
                                 "tuned_fraction": n / total, "seconds": round(time.perf_counter() - start, 1)})
            return scores["memorization"], scores["quality"]

        study = optuna.create_study(directions=["minimize", "maximize"],
                                    sampler=optuna.samplers.TPESampler(seed=self.seed))
        study.optimize(objective, n_trials=self.trials)
        chosen = select_trial(self.history, self.memorization_budget)
        return {"chosen": chosen, "trials": self.history, "memorization_budget": self.memorization_budget,
                "pareto": [t.number for t in study.best_trials], "unet_parameters": total}


def noise_norm_memorization(model: DiffusionModel, captions: list[str], draws: int = 4) -> float:
    """Mean first-step noise-norm of ``captions`` (MemControl's memorization signal)."""
    engine = NoiseStepEngine(model, draws)
    return float(np.mean(score_chunk(engine, [make_detector("noise-norm")], captions)["noise-norm"]))
