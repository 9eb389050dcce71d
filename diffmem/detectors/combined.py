"""A calibrated combination of detectors: the sum of their z-scores on ordinary reference prompts.

    score(c) = sum_k ( s_k(c) - mean_ref(s_k) ) / std_ref(s_k)

Each member keeps its paper's orientation (higher = more likely memorized). Standardising on prompts
known to be ordinary puts signals of different units (a noise norm, a JVP norm, an entropy in nats)
on one scale without hand-set weights, the way ``anisotropy-calibrated`` combines its two terms;
the reference statistics are saved in the scan's provenance. Costs the sum of its members' passes
(noise-step members share one engine pass among themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.detectors.base import (
    DETECTORS,
    Detector,
    NoiseStepDetector,
    PromptDetector,
    make_detector,
    score_embeddings,
)
from diffmem.detectors.engine import NoiseStepEngine


@DETECTORS.register("combined")
@dataclass
class Combined(PromptDetector):
    """Sum of the members' z-scores, standardised on ``reference_prompts``."""

    name = "combined"
    needs_reference = True
    members: list[str] = field(default_factory=lambda: ["noise-norm", "sharpness", "attention-entropy"])
    member_options: dict[str, dict] = field(default_factory=dict)  # e.g. {"nn-margin": {"index": "/data/train"}}
    reference_prompts: list[str] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)  # member -> [mean, std] on the reference
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.members or len(set(self.members)) != len(self.members):
            raise ValueError(f"combined needs distinct member detectors, got {self.members}")
        unknown = sorted(set(self.member_options) - set(self.members))
        if unknown:
            raise ValueError(f"combined: member_options for {unknown}, which are not members {self.members}")
        self._members: list[Detector] = [make_detector(n, **self.member_options.get(n, {})) for n in self.members]

    def bind(self, model) -> None:
        for member in self._members:
            member.bind(model)

    def prepare(self, engine: NoiseStepEngine) -> None:
        for d in self._members:
            d.prepare(engine)
        if self.stats:
            return
        if len(self.reference_prompts) < 2:
            raise ValueError("combined needs at least 2 reference_prompts (ordinary prompts) or precomputed stats")
        # with a seed per prompt, a reference prompt's noise is seeded by its index in the reference list
        chunks = [score_embeddings(engine, self._members, engine.model.encode_prompts(self.reference_prompts[i:i + n]),
                                   list(range(i, min(i + n, len(self.reference_prompts)))))
                  for n in [self.batch_size] for i in range(0, len(self.reference_prompts), n)]
        for d in self._members:
            values = torch.cat([c[d.name] for c in chunks]).double()
            self.stats[d.name] = [float(values.mean()), float(values.std())]

    def combine(self, member_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The combined score from the members' raw scores (also usable on stored scan columns)."""
        if not self.stats:
            raise RuntimeError("combined was not prepared: call prepare(engine) first")
        def as_double(v) -> torch.Tensor:
            return v.double() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)

        return sum((as_double(member_scores[n]) - m) / s for n, (m, s) in self.stats.items())

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        return self.combine(score_embeddings(engine, self._members, embeddings, prompt_ids))

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        step_indices = {i for d in self._members if isinstance(d, NoiseStepDetector) for i in d.timestep_indices()}
        prompt_calls = sum(d.unet_calls_per_prompt(engine) for d in self._members if isinstance(d, PromptDetector))
        return float(len(step_indices) * engine.n_draws + prompt_calls)

    def config(self) -> dict:
        cfg = super().config()
        cfg["reference_prompts"] = len(self.reference_prompts)
        return cfg
