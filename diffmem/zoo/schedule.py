"""Learning-rate schedules of the zoo's training stages (denoiser, attribute reader).

Builds 1-4 trained at a constant rate after a linear warm-up. The fifth SD-like build decays it along a half
cosine (Loshchilov & Hutter 2017, SGDR, without restarts) to a floor: a short CPU run ends on small steps that
settle the weights instead of stopping mid-stride at the peak rate. ``wsd`` (warm-up, stable, decay; Hu et al.
2024, MiniCPM; Hagele et al. 2024) holds the peak and spends only the last ``decay`` steps on that cosine, so a
run checkpointed at the peak rate can be lengthened and then cooled down: the rates up to the checkpoint are
the same whatever the final length (:func:`same_rates_until`, what a resumed build checks).
"""

from __future__ import annotations

import math

from diffmem.errors import DiffmemError

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "wsd")


class ScheduleError(DiffmemError, ValueError):
    """A schedule name the zoo does not know."""


def scheduled_lr(schedule: str, peak: float, step: int, total: int, warmup: int, final: float, decay: int = 0
                 ) -> float:
    """The learning rate at 0-based ``step`` of ``total``: linear warm-up to ``peak`` over ``warmup`` steps, then
    ``constant`` at ``peak``, ``cosine`` from ``peak`` down to ``peak * final`` at the last step (``total - 1``),
    or ``wsd``: ``peak`` until the last ``decay`` steps, which fall along the same half cosine."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return peak * warm
    if schedule == "cosine":
        start = warmup
    elif schedule == "wsd":
        if decay < 1 or decay > total - warmup:
            raise ScheduleError(f"wsd decay of {decay} steps does not fit {total} steps after a {warmup}-step "
                                "warm-up; expected 1 to total - warm-up")
        start = total - decay
    else:
        raise ScheduleError(f"learning-rate schedule '{schedule}' is not one of: {', '.join(SCHEDULES)}")
    progress = min(1.0, max(0.0, (step - start) / max(1, total - 1 - start)))
    return peak * warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def same_rates_until(first: dict, second: dict, steps: int) -> bool:
    """Do two schedules (``scheduled_lr`` keyword arguments but ``step``) give the same rate at every step below
    ``steps``? A checkpoint taken under ``first`` then continues under ``second`` exactly as if trained so."""
    return all(math.isclose(scheduled_lr(step=k, **first), scheduled_lr(step=k, **second), rel_tol=1e-12)
               for k in range(steps))
