"""Adversarial fine-tuning against embedding re-triggers (the defence of "Finding Dori", 2025).

Pruning-style fixes hide a memory that a small move in text-embedding space brings back. The defence
trains the UNet against that move. Each round:

1. *Inner search* (the DoRI attack, :func:`~diffmem.attacks.retrigger.optimise_embeddings`): for
   every memorized prompt, an embedding e* near its own e_0 that makes the *current* model denoise
   towards the memorized image;
2. *Outer update*: denoising loss that maps both e* and e_0 to a surrogate (non-replicating) image of
   the same prompt, plus a retain loss that keeps ordinary prompts' predictions, and the
   unconditional one that classifier-free guidance subtracts, where the original model had them
   (distillation on noised latents z_0 of the original model's own generations for those prompts,
   so every timestep sees the inputs it sees when sampling):

       L = E_t,eps [ || eps_theta(x_t(s), t, e*) - eps ||^2 + || eps_theta(x_t(s), t, e_0) - eps ||^2 ]
           + retain_weight * E_t,eps [ || eps_theta(x_t(z_0), t, c) - eps_orig(x_t(z_0), t, c) ||^2 ],
       c in {ordinary prompts, ""}

Targets (the memorized images) default to the model's own generation for the prompt. Surrogates
default to the model's own (:mod:`diffmem.mitigators.surrogates`, Dori's recipe): the generation of the
model under ``surrogate_source`` (random tokens by default) for the prompt, kept only when it is not a
copy (below the training index's threshold when ``index`` is given, else SSIM < ``surrogate_max_ssim``
to the original model's repeated generations); prompts without a valid surrogate are left out of the
forget set (``describe_fit()["surrogates"]`` says how many). Surrogates passed to ``fit`` are used as
given (e.g. the zoo's oracle renders, an ablation). ``lora_rank`` trains LoRA adapters
(peft) on the attention projections instead of the full UNet, merged into the weights at the end;
``lora_rank=None`` fine-tunes the full UNet (Dori's setting; Dori reports LoRA is not enough, on the
zoo it is). ``lora_targets`` narrows the adapters (peft's ``target_modules``: module-name suffixes, or
one regex matched against full names, e.g. ``.*attn2\.(to_k|to_v)`` for the cross-attention key/value
maps that alone read the text).

Defaults (LoRA r8, lr 1e-3, 5 rounds x 40 updates, retain weight 30 on 128 ordinary prompts) are the
best of the zoo benchmark's follow-up runs (README, Mitigators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.attacks.base import TrainingIndex
from diffmem.attacks.retrigger import optimise_embeddings
from diffmem.errors import DiffmemError
from diffmem.mitigators.base import MITIGATORS, WeightMitigator, check_prompt_lists, clone_model
from diffmem.models.model import DiffusionModel


def denoising_loss(model: DiffusionModel, latents: torch.Tensor, emb: torch.Tensor, n: int,
                   g: torch.Generator) -> torch.Tensor:
    """Epsilon-matching loss at ``n`` random (t, eps) per latent, differentiable in the UNet and ``emb``."""
    alphas = model.alphas_cumprod.float()
    t = torch.randint(0, len(alphas), (len(latents) * n,), generator=g)
    noise = torch.randn((len(latents) * n, *latents.shape[1:]), generator=g)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * latents.repeat_interleave(n, 0) + (1 - a).sqrt() * noise
    pred = model.predict_noise(zt.to(model.device), t.to(model.device), emb.repeat_interleave(n, 0))
    return (pred.float() - noise.to(model.device)).pow(2).mean()


LORA_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""Default LoRA targets: every attention projection (self- and cross-attention)."""


@MITIGATORS.register("adversarial-finetune", "dori-finetune")
@dataclass
class AdversarialFinetune(WeightMitigator):
    """Alternate DoRI trigger search and UNet updates towards surrogates, with a retain loss."""

    name = "adversarial-finetune"
    rounds: int = 5
    outer_steps: int = 40
    inner_steps: int = 20
    inner_lr: float = 0.1
    inner_max_relative_norm: float | None = 1.0
    lr: float = 1e-3
    batch: int = 4
    retain_weight: float = 30.0
    retain_prompts: int = 128
    lora_rank: int | None = 8  # None: the full UNet
    lora_targets: list[str] | str | None = None
    seed: int = 0
    surrogate_source: str = "random-tokens"
    surrogate_options: dict[str, Any] = field(default_factory=dict)
    surrogate_candidates: int = 4
    surrogate_max_ssim: float = 0.5
    # keep only surrogates that draw what the prompt names, when the caller gives a content check (a bench
    # task's per-image fidelity); off by default: the measured defaults did not use it
    surrogate_keep_content: bool = False
    sample_steps: int = 25  # DDIM steps of the generations the fit needs (targets, retain latents, surrogates)

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
            surrogates: torch.Tensor | None = None, targets: torch.Tensor | None = None,
            index: TrainingIndex | None = None,
            content: Callable[[torch.Tensor, list[str]], np.ndarray] | None = None) -> None:
        """``surrogates``: one non-replicating image per memorized prompt, or ``None`` to make them from the
        model (``index``: the training images they must not match, optional; ``content``: per image, whether
        it draws what its prompt names, used with ``surrogate_keep_content``)."""
        check_prompt_lists(memorized, ordinary)
        if surrogates is None:
            from diffmem.mitigators.surrogates import make_surrogates

            sset = make_surrogates(model, memorized, ordinary, source=self.surrogate_source,
                                   source_options=self.surrogate_options, candidates=self.surrogate_candidates,
                                   seed=self.seed, steps=self.sample_steps, index=index,
                                   max_ssim=self.surrogate_max_ssim,
                                   content=content if self.surrogate_keep_content else None)
            if self.surrogate_keep_content and not sset.content_checked:
                raise DiffmemError("surrogate_keep_content needs a content check (a bench task with a per-image "
                                   "fidelity metric); none was given")
            self._surrogate_info = sset.describe()
            if not sset.kept:
                raise DiffmemError(f"no model-derived surrogate passed the copy check for any of {len(memorized)} "
                                   f"prompts ({sset.rule}, threshold {sset.threshold}); try another "
                                   "--option surrogate_source=... or more surrogate_candidates")
            memorized = [memorized[i] for i in sset.kept]
            targets = None if targets is None else targets[sset.kept]
            surrogates = sset.images
        else:
            self._surrogate_info = {"source": "given", "prompts": len(memorized)}
        if len(surrogates) != len(memorized):
            raise DiffmemError(f"adversarial-finetune got {len(surrogates)} surrogate images for {len(memorized)} "
                               "memorized prompts; expected one each")
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        original = model
        self._model = clone_model(model)
        m = self._model
        if targets is None:
            targets = original.sample(memorized, [self.seed] * len(memorized),
                                      num_inference_steps=self.sample_steps).images
        target_lat = original.encode_images(targets).cpu()
        surrogate_lat = original.encode_images(surrogates).cpu()
        e0 = original.encode_prompts(memorized).detach()
        retain = ordinary[: self.retain_prompts]
        e_ret = torch.cat([original.encode_prompts(retain), original.empty_embedding()]).detach()
        z_ret = original.sample(retain, [self.seed + i for i in range(len(retain))],
                                num_inference_steps=self.sample_steps).latents
        params = self._trainable(m)
        opt = torch.optim.AdamW(params, lr=self.lr)
        self._history = []
        for _ in tqdm(range(self.rounds), desc="adversarial fine-tuning", dynamic_ncols=True):
            m.unet.eval()
            with torch.enable_grad():
                e_star = optimise_embeddings(m, e0, target_lat, self.inner_steps, self.inner_lr, self.batch,
                                             self.inner_max_relative_norm, int(torch.randint(2**31, (1,), generator=g)))
            m.unet.train()
            for _ in range(self.outer_steps):
                with torch.enable_grad():
                    loss = denoising_loss(m, surrogate_lat, e_star, self.batch, g) + \
                        denoising_loss(m, surrogate_lat, e0, self.batch, g)
                    retain_loss = self._retain_loss(m, original, e_ret, z_ret, g)
                    total = loss + self.retain_weight * retain_loss
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            self._history.append({"forget_loss": loss.item(), "retain_loss": retain_loss.item()})
        m.unet.eval()
        if self.lora_rank is not None:
            m.unet.fuse_lora()
            m.unet.unload_lora()
        m.unet.requires_grad_(False)

    def _trainable(self, m: DiffusionModel) -> list[torch.nn.Parameter]:
        if self.lora_rank is None:
            m.unet.requires_grad_(True)
            return list(m.unet.parameters())
        from peft import LoraConfig

        m.unet.requires_grad_(False)
        m.unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                      target_modules=self.lora_targets or list(LORA_ATTENTION_PROJECTIONS)))
        return [p for p in m.unet.parameters() if p.requires_grad]

    def _retain_loss(self, m: DiffusionModel, original: DiffusionModel, e_ret: torch.Tensor, z_ret: torch.Tensor,
                     g: torch.Generator) -> torch.Tensor:
        """Distillation on x_t of the original model's generations; the last row of ``e_ret`` is ``""``, whose
        x_t borrows a random ordinary generation."""
        idx = torch.randint(len(e_ret), (self.batch * 2,), generator=g)
        t = torch.randint(0, len(original.alphas_cumprod), (len(idx),), generator=g)
        a = original.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        borrowed = torch.randint(len(z_ret), idx.shape, generator=g)
        z0 = z_ret[torch.where(idx == len(z_ret), borrowed, idx)].to(original.device)
        x = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=g)
        with torch.no_grad():
            ref = original.predict_noise(x, t, e_ret[idx]).float()
        return (m.predict_noise(x, t, e_ret[idx]).float() - ref).pow(2).mean()

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def describe_fit(self) -> dict:
        n_params = sum(p.numel() for p in self._model.unet.parameters()) if hasattr(self, "_model") else None
        return {"history": getattr(self, "_history", []), "unet_parameters": n_params,
                "mode": "full" if self.lora_rank is None else f"lora-r{self.lora_rank}",
                "surrogates": getattr(self, "_surrogate_info", None)}
