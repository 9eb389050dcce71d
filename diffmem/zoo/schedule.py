"""Learning-rate schedules of the zoo's training stages (denoiser, attribute reader).

Builds 1-4 trained at a constant rate after a linear warm-up. The fifth SD-like build decays it along a half
cosine (Loshchilov & Hutter 2017, SGDR, without restarts) to a floor: a short CPU run ends on small steps that
settle the weights instead of stopping mid-stride at the peak rate.
"""

from __future__ import annotations

import math

from diffmem.errors import DiffmemError

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


class ScheduleError(DiffmemError, ValueError):
    """A schedule name the zoo does not know."""


def scheduled_lr(schedule: str, peak: float, step: int, total: int, warmup: int, final: float) -> float:
    """The learning rate at 0-based ``step`` of ``total``: linear warm-up to ``peak`` over ``warmup`` steps, then
    ``constant`` at ``peak`` or ``cosine`` from ``peak`` down to ``peak * final`` at the last step (``total - 1``)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return peak * warm
    if schedule != "cosine":
        raise ScheduleError(f"learning-rate schedule '{schedule}' is not one of: {', '.join(SCHEDULES)}")
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - 1 - warmup)))
    return peak * warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))
