"""Sharpness of the conditional score (Jeon et al., "Understanding and Mitigating Memorization in
Diffusion Models for Tabular and Image Data via Sharpness", ICML 2025).

With the score ``s(x, c) = -eps(x, t, c) / sqrt(1 - alpha_bar_t)`` and its Hessian-like Jacobian
``H(x, c) = d s / d x``, the first-step sharpness difference on the pure-noise latent x_T is

    S(c) = || (H_c - H_u) (s_c - s_u) ||_2,

one forward-mode Jacobian-vector product of ``x -> s_c(x) - s_u(x)`` along its own value
(``torch.func.jvp`` through both CFG branches in one batched call; math attention kernel, which
supports forward-mode AD). Memorized prompts sit in sharp, narrow modes: the conditional score bends
far more than the unconditional one. Averaged over the engine's shared noise draws.

On v-prediction models (SD 2.x), Jeon et al.'s code (Dongjae0324/sharpness_memorization_diffusion,
``local_model/pipe.py``, the ``sd_ver != 1`` branch of the detection code) takes as score
``(sqrt(a) v - x) / (1 - a)`` with the latent held fixed inside the differentiated function, so its score
difference is ``sqrt(a) (v_c - v_u) / (1 - a) = (eps_c - eps_u) / (1 - a)`` and its Jacobian difference
``sqrt(a) (dv_c - dv_u) / (1 - a)``; the true score ``-eps / sqrt(1 - a)`` gives
``-(eps_c - eps_u) / sqrt(1 - a)`` and ``-sqrt(a) (dv_c - dv_u) / sqrt(1 - a)``. Both factors differ by
``-1 / sqrt(1 - a)``, so the reference's sharpness is this one times ``1 / (1 - a)`` (issue #28), with
a = alpha_bar at the first timestep. ``mode="reference"`` (default) computes the reference's number;
``mode="epsilon"`` the true score's. On epsilon models the reference uses ``-eps / sqrt(1 - a)`` too (its
``sd_ver == 1`` branch): both modes are the same number. Sample-prediction models have no reference; both
modes use the true score there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffmem.detectors.anisotropy import MODES
from diffmem.detectors.base import DETECTORS, PromptDetector
from diffmem.detectors.engine import NoiseStepEngine


def score_scale(prediction_type: str, alpha_bar: float, mode: str) -> float:
    """The factor turning eps_c - eps_u into the score difference s_c - s_u: ``-1 / sqrt(1 - a)`` for the true
    score; ``1 / (1 - a)`` for Jeon et al.'s v-prediction score (``mode="reference"`` on a v model)."""
    if mode not in MODES:
        raise ValueError(f"sharpness mode {mode!r} unknown; expected one of {list(MODES)}")
    if mode == "reference" and prediction_type == "v_prediction":
        return 1.0 / (1.0 - alpha_bar)
    return -1.0 / (1.0 - alpha_bar) ** 0.5


def score_difference_jvp(model, latents: torch.Tensor, t: int, embeddings: torch.Tensor, alpha_bar: float,
                         guidance: torch.Tensor, mode: str = "reference") -> torch.Tensor:
    """(H_c - H_u)(s_c - s_u) at ``latents`` for per-row ``embeddings``, ``(N, C, H, W)``; ``guidance`` is
    eps_c - eps_u at ``latents``, already computed by the engine's x_T pass; ``mode`` picks the score (module
    docstring)."""
    scale = score_scale(model.prediction_type, alpha_bar, mode)

    def score_difference(x: torch.Tensor) -> torch.Tensor:
        eps_u, eps_c = model.guided_pair(x, t, embeddings)
        return (eps_c.float() - eps_u.float()) * scale

    with sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(score_difference, (latents,), (guidance.float() * scale,))
    return jvp


@DETECTORS.register("sharpness", "jeon")
@dataclass
class Sharpness(PromptDetector):
    """``|| (H_c - H_u)(s_c - s_u) ||`` at x_T and the first DDIM-50 timestep, mean over shared draws."""

    name = "sharpness"
    mode: str = "reference"  # "reference": Jeon et al.'s score on v-prediction models; "epsilon": the true score

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sharpness mode {self.mode!r} unknown; expected one of {list(MODES)}")

    @torch.no_grad()
    def score_prompts(self, model, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        b, d = len(embeddings), engine.n_draws
        t = engine.timestep(0)
        alpha_bar = float(engine.sampler.alphas_cumprod[t])
        batch = engine.run(embeddings, {0}, prompt_ids=prompt_ids)  # the engine's x_T pass (shared with noise-norm)
        guidance, latents = batch.guidance(0), batch.x_T()
        per_call = max(1, engine.max_unet_batch // (4 * d))
        out = []
        for start in range(0, b, per_call):
            emb = embeddings[start : start + per_call]
            # contiguous: with one draw the engine's shared x_T is a broadcast view, which forward-mode AD refuses
            x = latents[start : start + per_call].flatten(0, 1).contiguous()
            direction = guidance[start : start + per_call].flatten(0, 1).contiguous()
            jvp = score_difference_jvp(model, x, t, emb.repeat_interleave(d, 0), alpha_bar, direction, self.mode)
            out.append(jvp.flatten(1).norm(dim=1).view(len(emb), d).mean(1))
            engine.unet_calls += 2 * len(emb) * d
        return torch.cat(out)

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        """The engine's conditional pass at x_T (1 per draw, shared with noise-norm; the unconditional one is
        shared by all prompts) plus the JVP, a dual forward through both branches (2 per draw)."""
        return float(3 * engine.n_draws)
