"""The fine-tuning loop behind ``diffmem finetune``: Stable Diffusion's text-to-image objective on a user's
image-caption set, with a parameter family and block mask (:mod:`diffmem.finetune.families`) and the
training-time mitigations (:mod:`diffmem.finetune.mitigations`, :mod:`diffmem.finetune.dedup`).

The objective is diffusers' ``train_text_to_image.py`` (and MemControl's, HPO L1171-1249): VAE and text
encoder frozen, ``t ~ U{0..T-1}``, ``x_t = sqrt(a_t) z + sqrt(1 - a_t) eps``, MSE between the UNet's raw output
and its target (``eps``, or ``v`` on a v-prediction model), AdamW (0.9, 0.999, weight decay 1e-2, eps 1e-8),
gradient norm clipped at 1, constant learning rate. Latents are the VAE posterior means, computed once.
Captions are dropped to "" with probability ``caption_dropout`` (MemControl trains with 0.1, DS L23;
diffusers' script with 0).

**Resumable.** Every ``checkpoint_every`` steps the trainable state, the optimizer and the step go to
``WORK/state.pt`` (atomically). A rerun with the same model, data and settings continues from there, and one
that asks for more steps extends it; a different one is refused. All randomness of step ``k`` is drawn from
generators seeded by ``(seed, k)``, so a resumed or extended run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.errors import DiffmemError
from diffmem.finetune.dataset import FinetuneSet
from diffmem.finetune.families import check_mask, make_family
from diffmem.finetune.mitigations import CaptionPolicy, NoiseNormFilter, add_embedding_noise, text_guidance_norm
from diffmem.io import atomic_torch_save
from diffmem.models.model import DiffusionModel

STATE_FILE = "state.pt"


@dataclass
class FinetuneSettings:
    """Everything that decides a fine-tune's result (recorded in its ``finetune.json``)."""

    family: str = "full"
    family_options: dict[str, Any] = field(default_factory=dict)
    mask: dict[str, bool] = field(default_factory=dict)  # transformer unit -> trainable (absent: on)
    lr: float = 1e-5
    steps: int = 200
    batch: int = 8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = 25
    caption: CaptionPolicy = field(default_factory=CaptionPolicy)
    embedding_noise: float = 0.0
    noise_filter: NoiseNormFilter | None = None

    def __post_init__(self) -> None:
        for key, value, low in (("steps", self.steps, 1), ("batch", self.batch, 1),
                                ("checkpoint_every", self.checkpoint_every, 1)):
            if value < low:
                raise DiffmemError(f"{key} must be >= {low}; got {value}")
        if self.lr <= 0:
            raise DiffmemError(f"lr must be > 0; got {self.lr}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise DiffmemError(f"caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if self.embedding_noise < 0:
            raise DiffmemError(f"embedding_noise must be >= 0; got {self.embedding_noise}")

    def describe(self) -> dict[str, Any]:
        record = asdict(self)
        if self.noise_filter is not None:
            record["noise_filter"] = {k: v for k, v in record["noise_filter"].items() if k != "calibration"}
        return record


@dataclass
class FinetuneResult:
    """The fine-tuned model (weights baked into a plain UNet) and what the run did."""

    model: DiffusionModel
    trained_parameters: int
    unet_parameters: int
    losses: list[float]
    kept_share: list[float]  # per step: share of the batch the noise-norm filter kept (1.0 without it)
    filter_calibration: dict | None

    def describe(self) -> dict[str, Any]:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"trained_parameters": self.trained_parameters, "unet_parameters": self.unet_parameters,
                "trained_share": self.trained_parameters / self.unet_parameters,
                "steps": len(self.losses), "final_loss": float(np.mean(tail)) if tail else None,
                "kept_share": float(np.mean(self.kept_share)) if self.kept_share else None,
                "noise_filter": self.filter_calibration}


def step_generators(seed: int, step: int) -> tuple[torch.Generator, random.Random]:
    """The torch and Python generators of one step: a pure function of (seed, step), so resuming is exact."""
    key = int(hashlib.sha256(f"{seed}:{step}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(key), random.Random(key)


def training_target(model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                    ) -> torch.Tensor:
    """What the UNet's raw output is regressed on: ``eps``, or ``v = sqrt(a) eps - sqrt(1 - a) z``."""
    if model.prediction_type == "epsilon":
        return noise
    if model.prediction_type == "v_prediction":
        a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise DiffmemError(f"fine-tuning a {model.prediction_type} model is not supported (epsilon or v_prediction)")


def noised(model: DiffusionModel, latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(x_t, noise, t)`` with ``t`` uniform over the training schedule, one per latent."""
    t = torch.randint(0, len(model.alphas_cumprod), (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, noise, t


def encode_latents(model: DiffusionModel, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """VAE posterior means of ``images`` on the CPU, ``batch`` at a time (a fine-tuning set need not fit on the
    device at once)."""
    return torch.cat([model.encode_images(images[i:i + batch]).cpu() for i in range(0, len(images), batch)])


def unet_output(model: DiffusionModel, zt: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return model.unet(zt.to(model.device), t.to(model.device), encoder_hidden_states=emb.to(model.device)).sample


@torch.no_grad()
def guidance_norms(model: DiffusionModel, latents: torch.Tensor, captions: list[str], draws: int, seed: int,
                   batch: int = 16) -> np.ndarray:
    """``||out(x_t, t, c) - out(x_t, t, "")||_2`` of every latent at ``draws`` random timesteps (raw outputs):
    the norm Wen's filter thresholds and MemControl's memorization signal takes the batch maximum of."""
    emb = model.encode_prompts(captions, warn_truncation=False)
    empty = model.empty_embedding()
    norms = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed * 1000 + d)
        for i in range(0, len(latents), batch):
            zt, _, t = noised(model, latents[i:i + batch], g)
            pair = unet_output(model, torch.cat([zt, zt]), torch.cat([t, t]),
                               torch.cat([emb[i:i + batch], empty.expand(len(zt), -1, -1)]))
            norms.append(text_guidance_norm(pair[:len(zt)], pair[len(zt):]).cpu().numpy())
    return np.concatenate(norms)


def settings_key(model: DiffusionModel, data: FinetuneSet, settings: FinetuneSettings) -> str:
    """What a saved state must match to be resumed: model, data and every setting but the number of steps and
    how often the state is saved (a longer run extends a shorter one)."""
    described = {k: v for k, v in settings.describe().items() if k not in ("steps", "checkpoint_every")}
    payload = json.dumps({"model": model.fingerprint, "data": data.digest(), "settings": described},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetune(model: DiffusionModel, data: FinetuneSet, settings: FinetuneSettings, work: str | Path | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``data`` (``model`` itself is never changed); resumable in ``work``."""
    from diffmem.mitigators.base import clone_model

    if model.dtype != torch.float32:
        raise DiffmemError(f"fine-tuning needs float32 weights (loaded as {model.dtype}); load the model with "
                           "--dtype float32 (the checkpoint is written back in the dtype its files store)")
    tuned = clone_model(model)
    family = make_family(settings.family, **settings.family_options)
    check_mask(tuned.unet, settings.mask)  # the full family ignores the mask, but a wrong one is still refused
    groups = family.attach(tuned.unet, settings.mask)
    groups = [g for g in groups if g["params"]]
    trained = sum(p.numel() for g in groups for p in g["params"])
    if trained == 0:
        raise DiffmemError(f"family '{settings.family}' with this mask trains no parameter")
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay,
                                  eps=1e-8)
    latents = encode_latents(model, data.images)
    empty = model.empty_embedding()
    key = settings_key(model, data, settings)
    losses: list[float] = []
    kept: list[float] = []
    start = 0
    state_path = Path(work) / STATE_FILE if work is not None else None
    noise_filter = settings.noise_filter
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["key"] != key:
            raise DiffmemError(f"'{state_path.parent}' holds a fine-tune of another model, data set or settings; "
                               "use another --out (or delete the folder) to start this one")
        if state["step"] > settings.steps:
            raise DiffmemError(f"'{state_path.parent}' holds a fine-tune of {state['step']} steps, more than the "
                               f"{settings.steps} asked; ask for at least {state['step']} or use another --out")
        _load_trainable(tuned.unet, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, kept = state["step"], state["losses"], state["kept"]
        if noise_filter is not None:
            noise_filter.threshold = state["filter"]["threshold"]
            noise_filter.calibration = state["filter"]["calibration"]
    elif noise_filter is not None:
        noise_filter.calibrate(guidance_norms(model, latents, data.first_captions(), noise_filter.draws, settings.seed))
    tuned.unet.train()
    params = [p for g in groups for p in g["params"]]
    for step in range(start, settings.steps):
        g, rng = step_generators(settings.seed, step)
        rows = torch.randint(0, len(data), (settings.batch,), generator=g)
        captions = ["" if rng.random() < settings.caption_dropout
                    else settings.caption.caption(data.captions[int(i)], model.tokenizer, rng) for i in rows]
        emb = add_embedding_noise(model.encode_prompts(captions, warn_truncation=False), settings.embedding_noise, g)
        z = latents[rows]
        zt, noise, t = noised(model, z, g)
        with torch.enable_grad():
            pred = unet_output(tuned, zt, t, emb).float()
            per_sample = (pred - training_target(model, z, noise, t).to(pred.device)).pow(2).flatten(1).mean(1)
            mask = torch.ones(len(rows), dtype=torch.bool, device=pred.device)
            if noise_filter is not None:
                with torch.no_grad():
                    pred_empty = unet_output(tuned, zt, t, empty.expand(len(zt), -1, -1))
                mask = noise_filter.keep(text_guidance_norm(pred, pred_empty))
            kept.append(float(mask.float().mean()))
            if mask.any():  # Wen: a batch dropped whole takes no optimiser step
                loss = per_sample[mask].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                losses.append(loss.item())
            else:
                losses.append(float("nan"))
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
        if state_path is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            atomic_torch_save({"key": key, "step": step + 1, "trainable": _trainable_state(tuned.unet),
                               "optimizer": optimizer.state_dict(), "losses": losses, "kept": kept,
                               "filter": {"threshold": getattr(noise_filter, "threshold", None),
                                          "calibration": getattr(noise_filter, "calibration", None)}}, state_path)
    tuned.unet.eval()
    tuned.unet = family.bake(tuned.unet)
    tuned.unet.requires_grad_(False)
    total = sum(p.numel() for p in model.unet.parameters())
    return FinetuneResult(tuned, trained, total, losses, kept,
                          noise_filter.calibration if noise_filter is not None else None)


def _trainable_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _load_trainable(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    named = dict(unet.named_parameters())
    missing = sorted(set(state) - set(named))
    if missing:
        raise DiffmemError(f"the saved fine-tuning state names parameters this run does not train ({missing[0]}, ...)")
    with torch.no_grad():
        for n, value in state.items():
            named[n].copy_(value)
