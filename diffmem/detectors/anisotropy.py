"""Anisotropy / alignment (Asthana et al., ICLR 2026): two paired UNet calls on one pure-noise latent.

On the same x_T (no denoising):

    norm  = || eps_c(x_T, t_hi) - eps_u(x_T, t_hi) ||_2                   t_hi = timesteps[0]
    align = mean_{draws, h, w} cos( eps_u(x_T, t_lo)[:, h, w],
                                    (eps_c - eps_u)(x_T, t_lo)[:, h, w] )  t_lo = timesteps[-3]

of a 50-step DDIM schedule: the cosine is taken along the channel axis at every spatial position, then
averaged. The UNet is *told* the low-noise timestep while seeing pure noise: a memorized prompt's
guidance then points consistently along the unconditional denoising direction. Score
``gamma1 * norm + gamma2 * align`` with the authors' hand-set weights (SD1: 1, 2; SD2: 1, 0.1);
v-prediction outputs are converted to epsilon first by the model layer, which leaves the cosine
unchanged up to the conversion. ``anisotropy-calibrated`` needs no hand-set weights: it standardises
both terms on reference prompts known to be ordinary (z-scores) and adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.detectors.base import DETECTORS, NoiseStepDetector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine
from diffmem.detectors.noise_norm import guidance_norm

GAMMAS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1)}
LOW_INDEX = -3


def alignment(eps_uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """cos(eps_u, eps_c - eps_u) along channels (dim -3) per position, mean over draws and positions.

    ``eps_uncond``: ``(D, C, H, W)`` (broadcast over prompts); ``guidance``: ``(B, D, C, H, W)`` -> ``(B,)``.
    """
    cos = torch.nn.functional.cosine_similarity(eps_uncond[None].expand_as(guidance), guidance, dim=-3, eps=1e-8)
    return cos.flatten(1).mean(1)


def anisotropy_terms(batch: NoiseStepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm term, alignment term) per prompt, both ``(B,)``."""
    norm = guidance_norm(batch.eps_cond[0], batch.eps_uncond[0][None]).mean(dim=1)
    return norm, alignment(batch.eps_uncond[LOW_INDEX], batch.guidance(LOW_INDEX))


@DETECTORS.register("anisotropy", "asthana")
@dataclass
class Anisotropy(NoiseStepDetector):
    """``gamma1 * norm + gamma2 * align``; gammas from ``family`` unless given."""

    name = "anisotropy"
    family: str = "sd1"
    gamma1: float | None = None
    gamma2: float | None = None

    def __post_init__(self) -> None:
        if self.family not in GAMMAS:
            raise ValueError(f"anisotropy family {self.family!r} unknown; expected one of {sorted(GAMMAS)}")

    def weights(self) -> tuple[float, float]:
        g1, g2 = GAMMAS[self.family]
        return (g1 if self.gamma1 is None else self.gamma1, g2 if self.gamma2 is None else self.gamma2)

    def timestep_indices(self) -> tuple[int, ...]:
        return (0, LOW_INDEX)

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        g1, g2 = self.weights()
        norm, align = anisotropy_terms(batch)
        return g1 * norm + g2 * align


@DETECTORS.register("anisotropy-calibrated")
@dataclass
class AnisotropyCalibrated(NoiseStepDetector):
    """z(norm) + z(align), each standardised on ``reference_prompts`` (ordinary prompts)."""

    name = "anisotropy-calibrated"
    needs_reference = True
    reference_prompts: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def timestep_indices(self) -> tuple[int, ...]:
        return (0, LOW_INDEX)

    def prepare(self, engine: NoiseStepEngine) -> None:
        if self.stats:
            return
        if len(self.reference_prompts) < 2:
            raise ValueError("anisotropy-calibrated needs at least 2 reference_prompts (ordinary prompts) "
                             "or precomputed stats")
        emb = engine.model.encode_prompts(self.reference_prompts)
        norm, align = anisotropy_terms(engine.run(emb, {0, LOW_INDEX}))
        self.stats = {"norm_mean": float(norm.mean()), "norm_std": float(norm.std()),
                      "align_mean": float(align.mean()), "align_std": float(align.std())}

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        if not self.stats:
            raise RuntimeError("anisotropy-calibrated was not prepared: call prepare(engine) first")
        norm, align = anisotropy_terms(batch)
        s = self.stats
        return (norm - s["norm_mean"]) / s["norm_std"] + (align - s["align_mean"]) / s["align_std"]

    def config(self) -> dict:
        cfg = super().config()
        cfg["reference_prompts"] = len(self.reference_prompts)  # the count; the list is long
        return cfg
