"""Adversarial fine-tuning against embedding re-triggers: Finding Dori's defence (Kowalczuk et al., "Finding
Dori: Memorization in Text-to-Image Diffusion Models Is Not Local", arXiv 2507.16880), and diffmem's earlier
LoRA variant.

Pruning-style fixes hide a memory that a small move in text-embedding space brings back. The defence trains
the UNet against that move. Both variants share one loop (:class:`AdversarialFinetuneBase`); each round:

1. *Inner search* (the DoRI attack, :func:`~diffmem.attacks.retrigger.optimise_embeddings`): for every
   memorized prompt, an embedding e* that makes the *current* model denoise towards the memorized image
   (its latent z_mem), started from the prompt's own embedding e_0;
2. *Outer updates*: the plain denoising loss (:func:`denoising_loss`) that maps both e* and e_0 to a
   surrogate image s of the same prompt (same semantics, other pixels), plus a retain term:

       L = E_t,eps [ || eps_theta(x_t(s), t, e*) - eps ||^2 + || eps_theta(x_t(s), t, e_0) - eps ||^2 ]
           + retain_weight * L_retain

``adversarial-finetune`` (alias ``dori-finetune``): the paper's recipe, as far as its text says it (facts
from the paper as summarised in /work/shared/METHODS.md, "Finding Dori"; the paper's section and table
numbers could not be read here, so the citations below are to the paper as a whole):

- the *full UNet* is trained (the paper: LoRA "did not suffice");
- surrogates come from a *pruned model*: the generation, for the original prompt, of the model under a
  memorization-suppressing pruning method (``surrogate_source="nemo"``, the paper's own NeMo; or
  ``subspace-pruning``, its Wanda baseline), fitted first (:mod:`diffmem.mitigators.surrogates`), kept only
  where it is not a copy;
- the retain term is the *plain diffusion loss* on ordinary data (no distillation, weight 1):
  ``L_retain = E_t,eps || eps_theta(x_t(z_c), t, c) - eps ||^2`` over ordinary prompts c with their images
  z_c (``retain_images`` given to ``fit``, e.g. real training pairs; by default the original model's own
  generations for those prompts, the only ordinary data a checkpoint alone provides);
- adversarial embeddings are found during training by DoRI at the paper's attack settings (Adam lr 0.1,
  8 noise/timestep samples per step, 50 steps, no bound);
- 5 epochs (``rounds``); an epoch here is ``outer_steps`` updates (the paper's epoch runs over its own
  data set). Not stated in what could be read, so diffmem's choices: ``lr`` 1e-5 (AdamW; the usual rate for
  fine-tuning the full SD UNet), ``outer_steps`` 40, the original prompt's embedding kept among the
  triggers (DoRI's starting point), one DoRI start per round.

``adversarial-finetune-lora``: the variant diffmem shipped before (kept to be measured beside the paper's):
LoRA r8 on the attention projections (merged at the end), surrogates from random-token prompts, a retain
term that *distils* the original model's predictions for ordinary prompts and the empty prompt on noised
latents z_0 of its own generations (weight 30),

       L_retain = E_t,eps || eps_theta(x_t(z_0), t, c) - eps_orig(x_t(z_0), t, c) ||^2,   c in {ordinary, ""},

and a bounded inner search (20 steps, batch 4, relative norm 1). Those defaults are the best of the zoo
benchmark's follow-up runs (docs/mitigation.md).

For both: targets (the memorized images) default to the model's own generation for the prompt; surrogates
passed to ``fit`` are used as given (e.g. the zoo's oracle renders, an ablation); prompts whose
model-derived surrogates are all copies (a training index's threshold when ``index`` is given, else SSIM
``surrogate_max_ssim`` to the original model's generations) are left out of the forget set
(``describe_fit()["surrogates"]``). ``fit`` writes nothing: ``save`` writes a new checkpoint.
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


def noise_draws(n_train: int, shape: tuple[int, ...], rows: int, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` timesteps uniform in [0, n_train) and standard-normal noises of ``shape``, from ``g`` (in that
    order, so a caller holding the same generator state draws the same)."""
    t = torch.randint(0, n_train, (rows,), generator=g)
    return t, torch.randn((rows, *shape), generator=g)


def denoising_loss(model: DiffusionModel, latents: torch.Tensor, emb: torch.Tensor, n: int,
                   g: torch.Generator) -> torch.Tensor:
    """The plain diffusion (epsilon-matching) loss, ``n`` random (t, eps) per latent, differentiable in the UNet
    and ``emb``: ``mean || eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, e) - eps ||^2`` (Ho et al. 2020, eq. 14).
    Latent ``i`` is paired with embedding row ``i``."""
    alphas = model.alphas_cumprod.float()
    t, noise = noise_draws(len(alphas), tuple(latents.shape[1:]), len(latents) * n, g)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * latents.repeat_interleave(n, 0) + (1 - a).sqrt() * noise
    pred = model.predict_noise(zt.to(model.device), t.to(model.device), emb.repeat_interleave(n, 0))
    return (pred.float() - noise.to(model.device)).pow(2).mean()


LORA_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""Default LoRA targets: every attention projection (self- and cross-attention)."""


@dataclass
class ForgetSet:
    """The memorized prompts kept for fine-tuning, with their surrogate and (optional) target images."""

    prompts: list[str]
    surrogates: torch.Tensor  # (n, 3, H, W) in [0, 1]
    targets: torch.Tensor | None  # (n, 3, H, W) or None: the model's own generations
    info: dict[str, Any]


@dataclass
class AdversarialFinetuneBase(WeightMitigator):
    """The loop both variants share (module docstring); subclasses say what trains and what the retain term is."""

    rounds: int = 5
    outer_steps: int = 40
    inner_steps: int = 50
    inner_lr: float = 0.1
    inner_batch: int = 8
    inner_max_relative_norm: float | None = None
    lr: float = 1e-5
    batch: int = 4  # noise/timestep samples per latent in each outer update
    retain_weight: float = 1.0
    retain_prompts: int = 128
    seed: int = 0
    surrogate_source: str = "nemo"
    surrogate_options: dict[str, Any] = field(default_factory=dict)
    surrogate_candidates: int = 4
    surrogate_max_ssim: float = 0.5
    # keep only surrogates that draw what the prompt names, when the caller gives a content check (a bench
    # task's per-image fidelity); off by default
    surrogate_keep_content: bool = False
    sample_steps: int = 25  # DDIM steps of the generations the fit needs (targets, retain latents, surrogates)

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
            surrogates: torch.Tensor | None = None, targets: torch.Tensor | None = None,
            index: TrainingIndex | None = None,
            content: Callable[[torch.Tensor, list[str]], np.ndarray] | None = None,
            statistics_prompts: list[str] | None = None, retain_images: torch.Tensor | None = None) -> None:
        """``surrogates``: one non-replicating image per memorized prompt, or ``None`` to make them from the
        model (``index``: the training images they must not match, optional; ``content``: per image, whether
        it draws what its prompt names, used with ``surrogate_keep_content``; ``statistics_prompts``: passed to
        a surrogate source that takes them, e.g. NeMo's activation statistics). ``retain_images``: one image
        per retain prompt (the first ``retain_prompts`` ordinary prompts), for a retain term on real data."""
        check_prompt_lists(memorized, ordinary)
        forget = self.forget_set(model, memorized, ordinary, surrogates, targets, index, content,
                                 statistics_prompts)
        self._surrogate_info, self._forget = forget.info, forget
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        self._model = clone_model(model)
        m = self._model
        targets = forget.targets
        if targets is None:
            targets = model.sample(forget.prompts, [self.seed] * len(forget.prompts),
                                   num_inference_steps=self.sample_steps).images
        target_lat = model.encode_images(targets).cpu()
        surrogate_lat = model.encode_images(forget.surrogates).cpu()
        e0 = model.encode_prompts(forget.prompts).detach()
        self.prepare_retain(model, ordinary[: self.retain_prompts], retain_images)
        params = self.trainable(m)
        opt = torch.optim.AdamW(params, lr=self.lr)
        self._history = []
        for _ in tqdm(range(self.rounds), desc="adversarial fine-tuning", dynamic_ncols=True):
            m.unet.eval()
            with torch.enable_grad():
                e_star = optimise_embeddings(m, e0, target_lat, self.inner_steps, self.inner_lr, self.inner_batch,
                                             self.inner_max_relative_norm, int(torch.randint(2**31, (1,), generator=g)))
            m.unet.train()
            for _ in range(self.outer_steps):
                with torch.enable_grad():
                    loss = denoising_loss(m, surrogate_lat, e_star, self.batch, g) + \
                        denoising_loss(m, surrogate_lat, e0, self.batch, g)
                    retain_loss = self.retain_loss(m, g)
                    total = loss + self.retain_weight * retain_loss
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            self._history.append({"forget_loss": loss.item(), "retain_loss": retain_loss.item()})
        m.unet.eval()
        self.finish(m)
        m.unet.requires_grad_(False)

    def forget_set(self, model: DiffusionModel, memorized: list[str], ordinary: list[str],
                   surrogates: torch.Tensor | None, targets: torch.Tensor | None, index: TrainingIndex | None,
                   content: Callable[[torch.Tensor, list[str]], np.ndarray] | None,
                   statistics_prompts: list[str] | None) -> ForgetSet:
        """The surrogates given, or made by the model under ``surrogate_source`` and checked (prompts without a
        valid one are dropped, with their targets)."""
        if surrogates is not None:
            if len(surrogates) != len(memorized):
                raise DiffmemError(f"{self.name} got {len(surrogates)} surrogate images for {len(memorized)} "
                                   "memorized prompts; expected one each")
            return ForgetSet(list(memorized), surrogates, targets, {"source": "given", "prompts": len(memorized)})
        from diffmem.mitigators.surrogates import make_surrogates

        sset = make_surrogates(model, memorized, ordinary, source=self.surrogate_source,
                               source_options=self.surrogate_options, candidates=self.surrogate_candidates,
                               seed=self.seed, steps=self.sample_steps, index=index,
                               max_ssim=self.surrogate_max_ssim,
                               content=content if self.surrogate_keep_content else None,
                               statistics_prompts=statistics_prompts)
        if self.surrogate_keep_content and not sset.content_checked:
            raise DiffmemError("surrogate_keep_content needs a content check (a bench task with a per-image "
                               "fidelity metric); none was given")
        if not sset.kept:
            raise DiffmemError(f"no model-derived surrogate passed the copy check for any of {len(memorized)} "
                               f"prompts ({sset.rule}, threshold {sset.threshold}); try another "
                               "--option surrogate_source=... or more surrogate_candidates")
        return ForgetSet([memorized[i] for i in sset.kept], sset.images,
                         None if targets is None else targets[sset.kept], sset.describe())

    def prepare_retain(self, original: DiffusionModel, prompts: list[str], images: torch.Tensor | None) -> None:
        """Hold what :meth:`retain_loss` needs: the retain prompts' embeddings and image latents (the given
        images, else the original model's generations, seeds ``seed + i``), and the original model."""
        if images is not None and len(images) != len(prompts):
            raise DiffmemError(f"{self.name} got {len(images)} retain images for {len(prompts)} retain prompts; "
                               "expected one each")
        self._original, self._retain_given = original, images is not None
        self._e_ret = original.encode_prompts(prompts).detach()
        if images is not None:
            self._z_ret = original.encode_images(images).cpu()
        else:
            self._z_ret = original.sample(prompts, [self.seed + i for i in range(len(prompts))],
                                          num_inference_steps=self.sample_steps).latents.cpu()

    def retain_rows(self, g: torch.Generator) -> torch.Tensor:
        """Which retain pairs one update sees: ``2 * batch`` drawn uniformly with replacement from ``g``."""
        return torch.randint(len(self._z_ret), (self.batch * 2,), generator=g)

    def retain_loss(self, m: DiffusionModel, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def trainable(self, m: DiffusionModel) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def finish(self, m: DiffusionModel) -> None:
        """Anything to do to the trained UNet before it is saved (merge adapters)."""

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def mode(self) -> str:
        raise NotImplementedError

    def describe_fit(self) -> dict:
        n_params = sum(p.numel() for p in self._model.unet.parameters()) if hasattr(self, "_model") else None
        return {"history": getattr(self, "_history", []), "unet_parameters": n_params, "mode": self.mode(),
                "retain": self.retain_description(), "surrogates": getattr(self, "_surrogate_info", None)}

    def retain_description(self) -> str:
        raise NotImplementedError


@MITIGATORS.register("adversarial-finetune", "dori-finetune")
@dataclass
class AdversarialFinetune(AdversarialFinetuneBase):
    """Finding Dori's defence: full UNet, surrogates from a pruned model, plain diffusion loss as retain term."""

    name = "adversarial-finetune"

    def trainable(self, m: DiffusionModel) -> list[torch.nn.Parameter]:
        m.unet.requires_grad_(True)
        return list(m.unet.parameters())

    def retain_loss(self, m: DiffusionModel, g: torch.Generator) -> torch.Tensor:
        """The plain diffusion loss on ``2 * batch`` retain pairs (one noise/timestep draw each)."""
        idx = self.retain_rows(g)
        return denoising_loss(m, self._z_ret[idx].to(m.device), self._e_ret[idx], 1, g)

    def mode(self) -> str:
        return "full"

    def retain_description(self) -> str:
        source = "given images" if getattr(self, "_retain_given", False) else "the original model's generations"
        return f"diffusion loss on ordinary prompts with {source}"


@MITIGATORS.register("adversarial-finetune-lora")
@dataclass
class AdversarialFinetuneLoRA(AdversarialFinetuneBase):
    """diffmem's earlier variant: LoRA, random-token surrogates, distillation retain term (module docstring)."""

    name = "adversarial-finetune-lora"
    inner_steps: int = 20
    inner_batch: int = 4
    inner_max_relative_norm: float | None = 1.0
    lr: float = 1e-3
    retain_weight: float = 30.0
    surrogate_source: str = "random-tokens"
    lora_rank: int = 8
    lora_targets: list[str] | str | None = None

    def trainable(self, m: DiffusionModel) -> list[torch.nn.Parameter]:
        from peft import LoraConfig

        m.unet.requires_grad_(False)
        m.unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank, init_lora_weights="gaussian",
                                      target_modules=self.lora_targets or list(LORA_ATTENTION_PROJECTIONS)))
        return [p for p in m.unet.parameters() if p.requires_grad]

    def finish(self, m: DiffusionModel) -> None:
        m.unet.fuse_lora()
        m.unet.unload_lora()

    def prepare_retain(self, original, prompts, images) -> None:
        """As the base, plus the empty prompt's embedding as the last retain row (its x_t borrows a random
        ordinary generation)."""
        super().prepare_retain(original, prompts, images)
        self._e_ret = torch.cat([self._e_ret, original.empty_embedding()]).detach()

    def retain_loss(self, m: DiffusionModel, g: torch.Generator) -> torch.Tensor:
        """Distillation on x_t of the retain latents: the patched model's prediction against the original's."""
        original, z_ret, e_ret = self._original, self._z_ret, self._e_ret
        idx = torch.randint(len(e_ret), (self.batch * 2,), generator=g)
        t = torch.randint(0, len(original.alphas_cumprod), (len(idx),), generator=g)
        a = original.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        borrowed = torch.randint(len(z_ret), idx.shape, generator=g)
        z0 = z_ret[torch.where(idx == len(z_ret), borrowed, idx)].to(original.device)
        x = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=g)
        with torch.no_grad():
            ref = original.predict_noise(x, t, e_ret[idx]).float()
        return (m.predict_noise(x, t, e_ret[idx]).float() - ref).pow(2).mean()

    def mode(self) -> str:
        return f"lora-r{self.lora_rank}"

    def retain_description(self) -> str:
        return "distillation of the original model on ordinary prompts and the empty prompt"
