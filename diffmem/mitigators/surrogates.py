"""Surrogate images from the model itself: what a memorized prompt should draw instead of its copy.

Adversarial fine-tuning (Finding Dori, 2025) steers memorized prompts towards *surrogates*: images with
the prompt's semantics but other pixels. Dori takes them from a memorization-suppressed model: the
generation, for the original prompt, of the model under a mitigation. Here the suppressing model is
any registered mitigator (``source``), so surrogates exist for any checkpoint:

- an inference-time mitigation (``random-tokens`` by default: random words inserted into the prompt;
  or ``embedding-noise``), applied to the model as it is;
- a pruning one (``nemo``: per-prompt neuron blocking; ``subspace-pruning``, ``nemo-union``: pruned
  weights), fitted first on the memorized and ordinary prompts (and ``statistics_prompts`` when its ``fit``
  takes them, e.g. NeMo's activation statistics). This is Dori's recipe: a pruned model's generations.

The suppressed model draws ``candidates`` images per prompt (candidate ``j`` uses sampling seed
``seed + j`` and, for an inference source without a fit whose ``seed`` option draws its perturbation
(random tokens, embedding noise), mitigator seed ``seed + j``: other random words or other noise). A source
that is fitted (any pruning method, prompt adaptation) is fitted once: its ``seed`` is a fitting seed (NeMo's
localisation seeds), and refitting it per candidate would only multiply the cost. A candidate is kept only
when it is not a copy:

- with a training index: its nearest training image is below the index's match threshold (it copies
  no training image at all, neither the prompt's own nor another one);
- without one: its SSIM to each of ``reference_samples`` generations of the *original* model for the
  prompt is below ``max_ssim`` (it differs from what the model repeats for that prompt).

With a ``content`` check (a task's per-image fidelity: does the image draw what the prompt names?), a
candidate must also pass it, so the surrogate keeps the prompt's semantics and not only avoids its
pixels (Dori's surrogates are "same semantics, other pixels"; a random-token scene may keep neither).

The first kept candidate (in seed order) is the prompt's surrogate; prompts with no kept candidate are
rejected, and the caller drops them from the forget set. :class:`SurrogateSet` reports how many were
kept and rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffmem.attacks.base import TrainingIndex
from diffmem.errors import DiffmemError
from diffmem.eval.similarity import ssim_pairs
from diffmem.models.model import DiffusionModel

DEFAULT_SOURCE = "random-tokens"


@dataclass
class SurrogateSet:
    """Surrogates of the kept prompts, and which prompts were kept."""

    images: torch.Tensor  # (len(kept), 3, H, W) in [0, 1]
    kept: list[int]  # indices into the prompt list
    similarity: list[float]  # per prompt: the chosen candidate's similarity (nan when rejected)
    rule: str  # "training-index" or "original-generations"
    source: dict[str, Any]
    threshold: float
    candidates: int
    n_prompts: int = 0
    chosen_candidate: list[int] = field(default_factory=list)  # per kept prompt
    content_checked: bool = False  # candidates also had to draw what the prompt names
    content_passed: float | None = None  # share of all candidates that passed the content check

    def describe(self) -> dict[str, Any]:
        sims = [s for s in self.similarity if not np.isnan(s)]
        return {"source": self.source, "rule": self.rule, "threshold": self.threshold,
                "content_checked": self.content_checked, "content_passed": self.content_passed,
                "candidates": self.candidates, "prompts": self.n_prompts, "kept": len(self.kept),
                "rejected": self.n_prompts - len(self.kept),
                "mean_similarity_kept": float(np.mean(sims)) if sims else None,
                "mean_chosen_candidate": float(np.mean(self.chosen_candidate)) if self.chosen_candidate else None}


def suppressed_model(model: DiffusionModel, source: str, options: dict[str, Any], memorized: list[str],
                     ordinary: list[str], statistics_prompts: list[str] | None = None) -> DiffusionModel:
    """The model under mitigator ``source``, fitted first (``statistics_prompts`` go to a ``fit`` that takes
    them)."""
    from diffmem.mitigators.adversarial_finetune import AdversarialFinetuneBase
    from diffmem.mitigators.base import MITIGATORS, InferenceMitigator, fit_with, make_mitigator

    if issubclass(MITIGATORS.get(source), AdversarialFinetuneBase):
        raise DiffmemError(f"{source} cannot be adversarial fine-tuning's surrogate source; choose e.g. nemo, "
                           "subspace-pruning or random-tokens")
    mitigator = make_mitigator(source, **options)
    fit_with(mitigator, model, memorized, ordinary, statistics_prompts=statistics_prompts)
    return mitigator.apply(model) if isinstance(mitigator, InferenceMitigator) else mitigator.patched()


def redraws_per_candidate(cls: type) -> bool:
    """Whether a source draws a fresh perturbation from its ``seed`` option at no fitting cost (an inference
    method that does not override ``fit``): then each candidate gets its own mitigator seed."""
    from diffmem.mitigators.base import InferenceMitigator, Mitigator

    return (issubclass(cls, InferenceMitigator) and cls.fit is Mitigator.fit
            and "seed" in {f.name for f in dataclasses.fields(cls)})


def make_surrogates(model: DiffusionModel, memorized: list[str], ordinary: list[str], *,
                    source: str = DEFAULT_SOURCE, source_options: dict[str, Any] | None = None,
                    candidates: int = 4, seed: int = 0, steps: int = 25,
                    index: TrainingIndex | None = None, max_ssim: float = 0.5, reference_samples: int = 4,
                    content: Callable[[torch.Tensor, list[str]], np.ndarray] | None = None,
                    statistics_prompts: list[str] | None = None) -> SurrogateSet:
    """Generate, check and pick one surrogate per memorized prompt (see the module docstring). ``content``:
    per image, whether it draws what its prompt names (``(N,)`` bool), e.g. a bench task's fidelity;
    ``statistics_prompts``: for a source whose ``fit`` takes them (NeMo)."""
    from diffmem.mitigators.base import MITIGATORS

    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    options = dict(source_options or {})
    redraw = redraws_per_candidate(MITIGATORS.get(source))
    n = len(memorized)
    images: list[torch.Tensor] = []
    suppressed = None
    for j in range(candidates):
        if redraw or suppressed is None:
            suppressed = suppressed_model(model, source, options | ({"seed": seed + j} if redraw else {}),
                                          memorized, ordinary, statistics_prompts)
        images.append(suppressed.sample(memorized, [seed + j] * n, num_inference_steps=steps).images)
    cand = torch.stack(images, 1)  # (n, candidates, 3, H, W)
    flat = cand.flatten(0, 1)
    if index is not None:
        sim = index.matcher.match(flat).similarity.view(n, candidates)
        ok = sim <= index.threshold
        rule, threshold = "training-index", float(index.threshold)
    else:
        k = reference_samples
        ref = model.sample([p for p in memorized for _ in range(k)], [seed + 10_000 + r for _ in memorized
                                                                     for r in range(k)],
                           num_inference_steps=steps).images.view(n, k, *flat.shape[1:])
        a = cand.unsqueeze(2).expand(-1, -1, k, -1, -1, -1).flatten(0, 2)
        b = ref.unsqueeze(1).expand(-1, candidates, -1, -1, -1, -1).flatten(0, 2)
        sim = ssim_pairs(a, b).view(n, candidates, k).amax(2)
        ok = sim < max_ssim
        rule, threshold = "original-generations", float(max_ssim)
    passed = None
    flags = None if content is None else content(flat, [p for p in memorized for _ in range(candidates)])
    if flags is not None:  # a check that cannot say (returns None) checks nothing
        shows = torch.as_tensor(np.asarray(flags, dtype=bool)).view(n, candidates)
        ok = ok & shows
        passed = float(shows.float().mean())
    kept, chosen, sims, out = [], [], [], []
    for i in range(n):
        valid = torch.nonzero(ok[i]).flatten().tolist()
        if valid:
            kept.append(i)
            chosen.append(valid[0])
            out.append(cand[i, valid[0]])
            sims.append(float(sim[i, valid[0]]))
        else:
            sims.append(float("nan"))
    stacked = torch.stack(out) if out else torch.empty(0, *flat.shape[1:])
    return SurrogateSet(stacked, kept, sims, rule, {"name": source, **options}, threshold, candidates, n, chosen,
                        flags is not None, passed)
