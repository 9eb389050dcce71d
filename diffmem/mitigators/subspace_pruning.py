"""Subspace / Wanda-style pruning of feed-forward weights (Chavhan et al., "ConceptPrune", 2024).

For every transformer feed-forward output projection ``ff.net.2`` (input = the GEGLU output), score
each weight by its magnitude times the L2 norm of its input activation (Wanda, Sun et al. 2024):

    S_mem[i, j] = |W_ij| * || X_mem[:, j] ||_2        S_ord[i, j] = |W_ij| * || X_ord[:, j] ||_2

with X read at the first denoising step (pure noise x_T, conditional branch) on memorized and on
ordinary prompts. In every output row i, the top ``fraction`` of weights by S_mem are zeroed where
S_mem > S_ord: the weights that matter for the memorized prompts more than for ordinary ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError
from diffmem.mitigators.base import MITIGATORS, WeightMitigator, check_prompt_lists, clone_model
from diffmem.mitigators.hooks import find_modules, first_step_activations
from diffmem.models.model import DiffusionModel


@MITIGATORS.register("subspace-pruning", "wanda")
@dataclass
class SubspacePruning(WeightMitigator):
    """Zero the most memorization-specific feed-forward weights (``fraction`` per output row)."""

    name = "subspace-pruning"
    fraction: float = 0.1
    pattern: str = r"ff\.net\.2$"
    draws: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise DiffmemError(f"pruning fraction must be in (0, 1), got {self.fraction}")

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str]) -> None:
        check_prompt_lists(memorized, ordinary)
        self._model = clone_model(model)
        modules = find_modules(self._model.unet, self.pattern)

        def input_norm(x: torch.Tensor) -> torch.Tensor:  # (draws, tokens, channels) -> (channels,)
            return x.pow(2).sum((0, 1)).sqrt()

        act = {kind: first_step_activations(self._model, prompts, modules, input_norm, use_input=True,
                                            draws=self.draws, seed=self.seed)
               for kind, prompts in (("mem", memorized), ("ord", ordinary))}
        self._pruned = {}
        with torch.no_grad():
            for name, layer in modules.items():
                w = layer.weight.abs().float()
                s_mem = w * act["mem"][name].pow(2).sum(0).sqrt()[None]
                s_ord = w * act["ord"][name].pow(2).sum(0).sqrt()[None]
                k = max(1, int(round(self.fraction * w.shape[1])))
                top = s_mem.topk(k, dim=1).indices
                mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True) & (s_mem > s_ord)
                layer.weight[mask] = 0
                self._pruned[name] = int(mask.sum())

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def describe_fit(self) -> dict:
        return {"pruned_weights": getattr(self, "_pruned", {}),
                "total_pruned": sum(getattr(self, "_pruned", {}).values())}
