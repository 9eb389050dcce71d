"""Subspace / Wanda pruning of feed-forward weights (Chavhan et al., "ConceptPrune", 2024; code:
ruchikachavhan/concept-prune), as its authors run it on memorization, and the earlier first-step variant.

Every transformer feed-forward output projection ``ff.net.2`` (input = the GEGLU output) is scored per
weight by Wanda's criterion (Sun et al. 2024), its magnitude times the column norm of its input,

    S_target[i, j] = |W_ij| * ||X_target[:, j]||_2        S_base[i, j] = |W_ij| * ||X_base[:, j]||_2

and in every output row i the top ``fraction`` of weights by S_target are pruned where S_target > S_base.

``subspace-pruning`` (faithful, the default):

- layers: Linear layers named ``ff.net`` without ``proj``, i.e. ``ff.net.2`` (``wanda/wanda.py`` L57-60);
  unfused LoRA adapters are merged first, so the scored weight is the one the model runs with;
- activations: each token row of the GEGLU output L2-normalised over channels
  (``neuron_receivers/wanda_receiver.py`` L47-49), column norms accumulated over all rows and prompts
  (``utils/base_utils.py`` L236-243), read while sampling with full CFG, both halves in the batch
  (``neuron_receivers/base_receiver.py`` L92: a plain pipeline call, default guidance 7.5), one
  generation per prompt from one fixed seed (L90);
- baseline: the empty prompt, one per memorized prompt (``utils/prompts.py`` L190:
  ``base_prompts = ['' for _ in target_prompts]``): equal counts. ``baseline="ordinary"`` contrasts with
  the ordinary prompts instead, their column norm rescaled to the memorized count (a norm summed over N
  prompts grows with sqrt(N)), so the result does not depend on how many ordinary prompts are given;
- sparsity: ``skill_ratio`` 0.01 (``configs/wanda_config.yaml`` L5), ``int(ratio * in_features)`` per row
  (``wanda/wanda.py`` L190-201; at least 1 here, so layers under 100 inputs are not left unpruned);
- a mask per sampling step, the union over the first 10 steps (``wanda/save_union_over_time.py``
  L96-104 with ``select_ratio`` 0.0; tau 10 in the released checkpoints, ``utils/load_models.py`` L31:
  ``skill_ratio_0.01_timesteps_10_threshold0.0``); the masked weights are zeroed (L113-118).

``subspace-pruning-first-step`` (the earlier diffmem variant, kept for comparison): raw input norms at
the first step only, conditional branch at x_T over ``draws`` noise draws, memorized against the ordinary
prompts as given (unequal counts), 10% per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.mitigators.base import MITIGATORS, WeightMitigator, check_prompt_lists, clone_model
from diffmem.mitigators.hooks import find_modules, first_step_activations, fuse_adapters, sampling_column_norms
from diffmem.models.model import DiffusionModel

BASELINES = ("empty", "ordinary")


def wanda_mask(weight: torch.Tensor, norm_target: torch.Tensor, norm_base: torch.Tensor, k: int) -> torch.Tensor:
    """Weights to prune: per output row the top ``k`` by |W| * target norm, where that beats |W| * base norm.
    ``weight`` is ``(out, in)``, the norms ``(in,)``."""
    w = weight.abs().float()
    s_target, s_base = w * norm_target[None], w * norm_base[None]
    top = s_target.topk(k, dim=1).indices
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True) & (s_target > s_base)


@dataclass
class WandaPruning(WeightMitigator):
    """Shared fit/save logic: subclasses say how the target and base activation norms are read."""

    fraction: float = 0.01
    pattern: str = r"ff\.net\.2$"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise DiffmemError(f"pruning fraction must be in (0, 1), got {self.fraction}")

    def masks(self, model: DiffusionModel, modules: dict[str, nn.Module], memorized: list[str],
              ordinary: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str]) -> None:
        check_prompt_lists(memorized, ordinary, ordinary_needed=self.needs_ordinary())
        self._model = clone_model(model)
        self._fused = fuse_adapters(self._model.unet)
        modules = find_modules(self._model.unet, self.pattern)
        self._masks = self.masks(self._model, modules, memorized, ordinary)
        with torch.no_grad():
            for name, mask in self._masks.items():
                modules[name].weight[mask] = 0
        self._weights_total = sum(m.weight.numel() for m in modules.values())

    def needs_ordinary(self) -> bool:
        return True

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def describe_fit(self) -> dict:
        pruned = {n: int(m.sum()) for n, m in getattr(self, "_masks", {}).items()}
        total = sum(pruned.values())
        return {"pruned_weights": pruned, "total_pruned": total,
                "pruned_share": total / self._weights_total if getattr(self, "_weights_total", 0) else None,
                "lora_fused": getattr(self, "_fused", False)}


@MITIGATORS.register("subspace-pruning", "wanda", "concept-prune")
@dataclass
class SubspacePruning(WandaPruning):
    """ConceptPrune on memorized prompts as its authors run it (see the module docstring)."""

    name = "subspace-pruning"
    timesteps: int = 10  # union over the first 10 sampling steps (utils/load_models.py L31)
    baseline: str = "empty"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.baseline not in BASELINES:
            raise DiffmemError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if not 1 <= self.timesteps <= self.num_inference_steps:
            raise DiffmemError(f"timesteps must be in [1, {self.num_inference_steps}], got {self.timesteps}")

    def needs_ordinary(self) -> bool:
        return self.baseline == "ordinary"

    def column_norms(self, model: DiffusionModel, modules: dict[str, nn.Module], prompts: list[str]
                     ) -> dict[str, torch.Tensor]:
        return sampling_column_norms(model, prompts, modules, self.timesteps, self.seed, self.num_inference_steps,
                                     self.guidance_scale)

    def masks(self, model, modules, memorized, ordinary):
        target = self.column_norms(model, modules, memorized)
        if self.baseline == "empty":  # n identical runs of '' from one seed: n times one run's sum of squares
            ref, count = self.column_norms(model, modules, [""]), 1
        else:
            ref, count = self.column_norms(model, modules, ordinary), len(ordinary)
        scale = (len(memorized) / count) ** 0.5  # equal counts: column norms grow with sqrt(prompts)
        return {name: torch.stack([wanda_mask(layer.weight, target[name][t], ref[name][t] * scale,
                                              max(1, int(self.fraction * layer.in_features)))
                                   for t in range(self.timesteps)]).any(0)
                for name, layer in modules.items()}


@MITIGATORS.register("subspace-pruning-first-step")
@dataclass
class SubspacePruningFirstStep(WandaPruning):
    """The earlier diffmem variant: raw first-step norms at x_T, memorized vs ordinary as given, a tenth per row."""

    name = "subspace-pruning-first-step"
    fraction: float = 0.1
    draws: int = 4

    def masks(self, model, modules, memorized, ordinary):
        def input_norm(x: torch.Tensor) -> torch.Tensor:  # (draws, tokens, channels) -> (channels,)
            return x.pow(2).sum((0, 1)).sqrt()

        act = {kind: first_step_activations(model, prompts, modules, input_norm, use_input=True, draws=self.draws,
                                            seed=self.seed)
               for kind, prompts in (("mem", memorized), ("ord", ordinary))}
        return {name: wanda_mask(layer.weight, act["mem"][name].pow(2).sum(0).sqrt(),
                                 act["ord"][name].pow(2).sum(0).sqrt(),
                                 max(1, int(round(self.fraction * layer.in_features))))
                for name, layer in modules.items()}
