"""MemControl (Dutt et al., WACV 2025): choose *which* parameters to fine-tune so that fine-tuning on
data with duplicated items does not memorize them.

Setting: a base model is fine-tuned on new data in which a subset is repeated many times. The search
space is a per-block on/off mask over the UNet's transformer blocks (down, mid, up) for one
parameter-efficient family, plus the learning rate:

- ``attention``: LoRA (peft, rank ``lora_rank``) on the attention projections of the selected blocks;
- ``bias-norm``: biases and normalisation weights of the selected blocks.

Bi-level search: the outer loop (Optuna, multi-objective TPE) proposes a mask and learning rate;
the inner loop fine-tunes for ``steps`` steps and measures memorization (first-step noise-norm of the
duplicated captions, mean) and quality (prompt fidelity of generic captions, zoo attribute reader).
The chosen configuration is the Pareto-optimal trial with the lowest memorization whose fidelity is
within ``fidelity_tolerance`` of the best trial's. Reported beside it: full fine-tuning and plain LoRA
(all blocks) with the same steps, and the fraction of parameters each tunes.
"""

from __future__ import annotations

import re
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


@dataclass
class MemControlSearch:
    """The bi-level search; ``evaluate(model) -> (memorization, fidelity)`` is supplied by the caller."""

    family: str = "attention"
    trials: int = 8
    steps: int = 150
    batch: int = 32
    lora_rank: int = 4
    lr_range: tuple[float, float] = (1e-4, 3e-3)
    fidelity_tolerance: float = 0.02
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def run(self, base: DiffusionModel, data: FinetuneData, evaluate) -> dict[str, Any]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        blocks = transformer_blocks(base.unet)
        total = sum(p.numel() for p in base.unet.parameters())

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            mask = [trial.suggest_categorical(b, [False, True]) for b in blocks]
            chosen = [b for b, on in zip(blocks, mask) if on] or [blocks[-1]]
            lr = trial.suggest_float("lr", *self.lr_range, log=True)
            model, n = finetune(base, data, self.family, chosen, lr, self.steps, self.batch, self.lora_rank,
                                self.seed)
            mem, fid_ = evaluate(model)
            self.history.append({"trial": trial.number, "blocks": chosen, "lr": lr, "memorization": mem,
                                 "fidelity": fid_, "tuned_fraction": n / total})
            return mem, fid_

        study = optuna.create_study(directions=["minimize", "maximize"],
                                    sampler=optuna.samplers.TPESampler(seed=self.seed))
        study.optimize(objective, n_trials=self.trials)
        best_fid = max(h["fidelity"] for h in self.history)
        ok = [h for h in self.history if h["fidelity"] >= best_fid - self.fidelity_tolerance]
        chosen = min(ok, key=lambda h: h["memorization"])
        return {"chosen": chosen, "trials": self.history,
                "pareto": [t.number for t in study.best_trials], "unet_parameters": total}


def noise_norm_memorization(model: DiffusionModel, captions: list[str], draws: int = 4) -> float:
    """Mean first-step noise-norm of ``captions`` (MemControl's memorization signal)."""
    engine = NoiseStepEngine(model, draws)
    return float(np.mean(score_chunk(engine, [make_detector("noise-norm")], captions)["noise-norm"]))
