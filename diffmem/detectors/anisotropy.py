"""Anisotropy / alignment (Asthana et al., ICLR 2026): two paired UNet calls on one pure-noise latent.

On the same x_T (no denoising), for an epsilon-prediction model (SD1):

    norm  = || eps_c(x_T, t_hi) - eps_u(x_T, t_hi) ||_2                   t_hi = timesteps[0]
    align = mean_{draws, h, w} cos( eps_u(x_T, t_lo)[:, h, w],
                                    (eps_c - eps_u)(x_T, t_lo)[:, h, w] )  t_lo = timesteps[-3]

of a 50-step DDIM schedule: the cosine is taken along the channel axis at every spatial position, then
averaged. The UNet is *told* the low-noise timestep while seeing pure noise: a memorized prompt's
guidance then points consistently along the unconditional denoising direction. Score
``gamma1 * norm + gamma2 * align`` with the authors' hand-set weights (SD1: 1, 2; SD2: 1, 0.1).

v-prediction models (SD2), ``mode="reference"`` (default): as the authors' code computes it, on which
their SD2 weights were set. The alignment cosine is taken on the raw UNet outputs, cos(v_u, v_c - v_u);
the norm is that of their score difference, (sqrt(a) v_c - x) / (1 - a) - (sqrt(a) v_u - x) / (1 - a)
with a = alpha_bar(t_hi), i.e. ||eps_c - eps_u|| / (1 - a). ``mode="epsilon"`` converts v to epsilon
first (eps = sqrt(a) v + sqrt(1 - a) x_T) and applies the SD1 formulas: the norm then lacks the
1 / (1 - a) factor, and the cosine changes, since eps_u carries the x_T term that the guidance (where
it cancels) does not. For epsilon models both modes are the same computation. For sample-prediction
models (no reference exists) ``reference`` takes the cosine on the raw x0 outputs and the epsilon norm.

``anisotropy-calibrated`` needs no hand-set weights: it standardises both terms on reference prompts
known to be ordinary (z-scores) and adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffmem.detectors.base import DETECTORS, NoiseStepDetector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine
from diffmem.detectors.noise_norm import guidance_norm

GAMMAS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1)}
LOW_INDEX = -3
MODES = ("reference", "epsilon")


def alignment(eps_uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """cos(eps_u, eps_c - eps_u) along channels (dim -3) per position, mean over draws and positions.

    ``eps_uncond`` and ``guidance``: ``(B, D, C, H, W)`` -> ``(B,)``.
    """
    cos = torch.nn.functional.cosine_similarity(eps_uncond.expand_as(guidance), guidance, dim=-3, eps=1e-8)
    return cos.flatten(1).mean(1)


def anisotropy_terms(batch: NoiseStepBatch, mode: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """(norm term, alignment term) per prompt, both ``(B,)``; ``mode`` as in the module docstring."""
    if mode not in MODES:
        raise ValueError(f"anisotropy mode {mode!r} unknown; expected one of {list(MODES)}")
    norm = guidance_norm(batch.eps_cond[0], batch.uncond(0)).mean(dim=1)
    if mode == "epsilon" or batch.prediction_type == "epsilon":
        return norm, alignment(batch.uncond(LOW_INDEX), batch.guidance(LOW_INDEX))
    if batch.prediction_type == "v_prediction":
        norm = norm / (1.0 - batch.alphas_cumprod[0])
    out_u, out_c = batch.raw_outputs(LOW_INDEX)
    return norm, alignment(out_u, out_c - out_u)


@DETECTORS.register("anisotropy", "asthana")
@dataclass
class Anisotropy(NoiseStepDetector):
    """``gamma1 * norm + gamma2 * align``; gammas from ``family`` unless given."""

    name = "anisotropy"
    family: str = "sd1"
    gamma1: float | None = None
    gamma2: float | None = None
    mode: str = "reference"

    def __post_init__(self) -> None:
        if self.family not in GAMMAS:
            raise ValueError(f"anisotropy family {self.family!r} unknown; expected one of {sorted(GAMMAS)}")
        if self.mode not in MODES:
            raise ValueError(f"anisotropy mode {self.mode!r} unknown; expected one of {list(MODES)}")

    def weights(self) -> tuple[float, float]:
        g1, g2 = GAMMAS[self.family]
        return (g1 if self.gamma1 is None else self.gamma1, g2 if self.gamma2 is None else self.gamma2)

    def timestep_indices(self) -> tuple[int, ...]:
        return (0, LOW_INDEX)

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        g1, g2 = self.weights()
        norm, align = anisotropy_terms(batch, self.mode)
        return g1 * norm + g2 * align


@DETECTORS.register("anisotropy-calibrated")
@dataclass
class AnisotropyCalibrated(NoiseStepDetector):
    """z(norm) + z(align), each standardised on ``reference_prompts`` (ordinary prompts)."""

    name = "anisotropy-calibrated"
    needs_reference = True
    reference_prompts: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    mode: str = "reference"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"anisotropy mode {self.mode!r} unknown; expected one of {list(MODES)}")

    def timestep_indices(self) -> tuple[int, ...]:
        return (0, LOW_INDEX)

    def prepare(self, engine: NoiseStepEngine) -> None:
        if self.stats:
            return
        if len(self.reference_prompts) < 2:
            raise ValueError("anisotropy-calibrated needs at least 2 reference_prompts (ordinary prompts) "
                             "or precomputed stats")
        emb = engine.model.encode_prompts(self.reference_prompts)
        ids = list(range(len(self.reference_prompts)))  # with a seed per prompt: the reference file's indices
        norm, align = anisotropy_terms(engine.run(emb, {0, LOW_INDEX}, prompt_ids=ids), self.mode)
        self.stats = {"norm_mean": float(norm.mean()), "norm_std": float(norm.std()),
                      "align_mean": float(align.mean()), "align_std": float(align.std())}

    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        if not self.stats:
            raise RuntimeError("anisotropy-calibrated was not prepared: call prepare(engine) first")
        norm, align = anisotropy_terms(batch, self.mode)
        s = self.stats
        return (norm - s["norm_mean"]) / s["norm_std"] + (align - s["align_mean"]) / s["align_std"]

    def config(self) -> dict:
        cfg = super().config()
        cfg["reference_prompts"] = len(self.reference_prompts)  # the count; the list is long
        return cfg
