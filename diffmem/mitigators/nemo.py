"""NeMo: localise memorization neurons in cross-attention value projections (Hintersdorf et al., 2024).

Layers: the value projections of cross-attention (``attn2.to_v``) in the down and mid blocks, found by
name pattern. Their activations are a function of the prompt alone (values of the text tokens).

1. On ordinary prompts: per channel, mean mu and std sigma of |activation| averaged over tokens.
2. For a memorized prompt, z = (|a| - mu) / sigma per channel. Candidate neurons: z > theta, theta
   from 5 down to 1 in steps of 0.25, plus the top-k channels per layer by |a| (k = 0, 1, 2), until the
   memorization signal drops below its threshold.
3. Prune back greedily: re-activate candidate neurons one layer at a time, then one by one, while the
   signal stays below the threshold.
4. The union over memorized prompts is deactivated by zeroing those rows of ``to_v`` (and biases).

Memorization signal (a deviation, stated): NeMo uses the max pairwise SSIM of first-step noise
differences across 10 seeds; diffmem uses any registered detector (``signal``, default the first-step
noise-norm of Wen et al. over ``draws`` shared noise draws), with the threshold set the same way as
NeMo's: mean + 1 std of the signal on ordinary prompts. On the zoo the noise-norm does not separate
memorized captions (detection benchmark, AUROC 0.40), so NeMo stops before replication does;
``signal="nn-ratio"`` (the zoo's best detector, needs the training images) is the alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffmem.detectors.base import make_detector
from diffmem.detectors.engine import NoiseStepEngine
from diffmem.mitigators.base import MITIGATORS, WeightMitigator, check_prompt_lists, clone_model
from diffmem.mitigators.hooks import find_modules, first_step_activations, zeroed_channels
from diffmem.models.model import DiffusionModel
from diffmem.scan import score_chunk


@MITIGATORS.register("nemo")
@dataclass
class NeMo(WeightMitigator):
    """Deactivate the fewest value-projection neurons that stop each memorized prompt's signal."""

    name = "nemo"
    pattern: str = r"(down_blocks|mid_block).*attn2\.to_v$"
    draws: int = 4
    seed: int = 0
    theta_start: float = 5.0
    theta_stop: float = 1.0
    theta_step: float = 0.25
    signal: str = "noise-norm"  # any registered detector: the memorization signal to bring below threshold
    signal_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._detector = make_detector(self.signal, **self.signal_options)  # fails early on an unknown name

    def _signal(self, model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
        """The signal detector's score per prompt (a fresh engine: hooks may change the unconditional branch too)."""
        engine = NoiseStepEngine(model, self.draws, self.seed)
        return torch.from_numpy(score_chunk(engine, [self._detector], prompts)[self._detector.name])

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str]) -> None:
        check_prompt_lists(memorized, ordinary)
        self._detector.bind(model)  # an image-space signal compares with *this* model's training images
        self._model = clone_model(model)
        modules = find_modules(self._model.unet, self.pattern)

        def mean_abs(x: torch.Tensor) -> torch.Tensor:  # (draws, tokens, channels) -> (channels,)
            return x[0].abs().mean(0)

        ordinary_act = first_step_activations(self._model, ordinary, modules, mean_abs, use_input=False, draws=1)
        mu = {n: a.mean(0) for n, a in ordinary_act.items()}
        sigma = {n: a.std(0).clamp_min(1e-6) for n, a in ordinary_act.items()}
        ordinary_signal = self._signal(self._model, ordinary)
        self._threshold = float(ordinary_signal.mean() + ordinary_signal.std())
        mem_act = first_step_activations(self._model, memorized, modules, mean_abs, use_input=False, draws=1)

        chosen: dict[str, set[int]] = {n: set() for n in modules}
        self._per_prompt = []
        for i, prompt in enumerate(memorized):
            z = {n: (mem_act[n][i] - mu[n]) / sigma[n] for n in modules}
            found = self._localise(prompt, modules, z, {n: mem_act[n][i] for n in modules})
            for n, idx in found.items():
                chosen[n].update(idx)
            self._per_prompt.append(sum(len(v) for v in found.values()))
        with torch.no_grad():
            for n, idx in chosen.items():
                if idx:
                    rows = torch.tensor(sorted(idx))
                    modules[n].weight[rows] = 0
                    if modules[n].bias is not None:
                        modules[n].bias[rows] = 0
        self._neurons = {n: sorted(v) for n, v in chosen.items() if v}

    def _below(self, prompt: str, modules, sel: dict[str, list[int]]) -> bool:
        with zeroed_channels(modules, {n: torch.tensor(v, dtype=torch.long) for n, v in sel.items()}):
            return float(self._signal(self._model, [prompt])[0]) < self._threshold

    def _localise(self, prompt: str, modules, z, act) -> dict[str, list[int]]:
        if self._below(prompt, modules, {}):
            return {}
        sel: dict[str, list[int]] | None = None
        for theta in np.arange(self.theta_start, self.theta_stop - 1e-9, -self.theta_step):
            for k in range(3):
                cand = {n: sorted(set((z[n] > theta).nonzero().flatten().tolist())
                                  | set(act[n].topk(k).indices.tolist() if k else [])) for n in modules}
                if self._below(prompt, modules, cand):
                    sel = cand
                    break
            if sel is not None:
                break
        if sel is None:
            return cand  # the widest selection tried; the signal could not be brought below threshold
        for n in list(sel):  # prune back: whole layers first, then single neurons
            trial = dict(sel)
            trial[n] = []
            if self._below(prompt, modules, trial):
                sel = trial
        for n in list(sel):
            for ch in list(sel[n]):
                trial = dict(sel)
                trial[n] = [c for c in sel[n] if c != ch]
                if self._below(prompt, modules, trial):
                    sel = trial
        return {n: v for n, v in sel.items() if v}

    def patched(self) -> DiffusionModel:
        if not hasattr(self, "_model"):
            raise RuntimeError("call fit() before patched()")
        return self._model

    def describe_fit(self) -> dict:
        neurons = getattr(self, "_neurons", {})
        return {"signal": self.signal, "signal_threshold": getattr(self, "_threshold", None), "neurons": neurons,
                "total_neurons": sum(len(v) for v in neurons.values()),
                "neurons_per_prompt": getattr(self, "_per_prompt", [])}
