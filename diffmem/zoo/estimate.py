"""How long a zoo build would take on this machine, measured before the hour of training is spent.

The SD-like zoo's recipes take 90 to 150 minutes on 2 cores, and the same recipe's denoiser step cost 0.673 s on one
2-core machine (build 9's record) and 1.268 s on another (docs/zoo-sd.md): a budget stated in minutes depends on
which two cores. :func:`estimate_build` runs the real :func:`~diffmem.zoo.build.build_zoo` twice on this machine
with few steps per stage (two probe sizes), reads each run's own stage times (``train_seconds_by_stage`` of
``zoo.json``) and fits, per stage, ``seconds = fixed + steps * seconds_per_step``. The projection for the configured
steps is that line; what no stage records (corpus render, tokenizer) is measured as the run's wall time beyond its
stages and added once. A 1-step build runs first and is discarded, so both probes run warm. The probes train with a
constant learning rate (a schedule changes no step's cost), write only into a temporary folder, and leave nothing
behind.

What the line leaves out: the process's one-time start-up (paid once in a real build); the periodic checkpoints of a
real build (one ``torch.save`` of the stage's state every ``checkpoint_every`` steps; the probes save once, at their
end); and labels (``diffmem zoo label``), which are not a stage. The projection is for this machine as loaded while
the probes ran: on a shared host the step cost itself moves (two estimates minutes apart measured 0.765 and 1.165 s
a denoiser step, docs/zoo-sd.md), so run it on an idle machine, with longer probes for a steadier slope.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from diffmem.zoo.build import TrainConfig, ZooBuildError, ZooConfig, build_zoo

# each stage's step-count field of TrainConfig, by the name zoo.json's train_seconds_by_stage gives the stage
STAGE_STEPS = {"vae": "vae_steps", "denoiser": "unet_steps", "attribute_reader": "reader_steps",
               "deepssim": "deepssim_steps"}
DEFAULT_PROBE_STEPS = (5, 25)
ESTIMATE_SIGNATURE = '"benchmark": "zoo-estimate"'  # the first line of the JSON: an --out file we wrote


@dataclass(frozen=True)
class StageEstimate:
    """One stage's fitted cost: ``fixed_seconds + steps * seconds_per_step`` (the two probe runs' line)."""

    stage: str
    steps: int
    seconds_per_step: float
    fixed_seconds: float
    probe_seconds: tuple[float, float]

    @property
    def projected_seconds(self) -> float:
        return max(0.0, self.fixed_seconds) + self.steps * self.seconds_per_step


def probe_config(cfg: ZooConfig, steps: int) -> ZooConfig:
    """``cfg`` with every stage cut to ``steps`` steps at a constant denoiser rate and no periodic checkpoints
    (a schedule or a save changes no step's cost; a probe shorter than a ``wsd`` decay would not start)."""
    train = dataclasses.replace(cfg.train, **{field: steps for field in STAGE_STEPS.values()},
                                unet_lr_schedule="constant", unet_lr_decay_steps=0, checkpoint_every=10**9)
    return dataclasses.replace(cfg, train=train)


def _timed_build(cfg: ZooConfig, root: Path) -> tuple[dict[str, float], float]:
    """Build ``cfg`` into ``root`` and return its stage seconds and its whole wall time."""
    started = time.perf_counter()
    out = build_zoo(root / "zoo", cfg, root / "work")
    wall = time.perf_counter() - started
    by_stage = json.loads((out / "zoo.json").read_text())["train_seconds_by_stage"]
    return {k: float(v) for k, v in by_stage.items()}, wall


def check_probe_steps(small: int, large: int) -> None:
    """Two probe sizes draw a line only when ``0 < small < large``."""
    if not 0 < small < large:
        raise ValueError(f"expected probe steps 0 < small < large; got {small}, {large}")


def fit_stages(cfg: TrainConfig, small: int, large: int, runs: tuple[dict[str, float], dict[str, float]]
               ) -> list[StageEstimate]:
    """Each stage's line through its two probe times (``small`` and ``large`` steps) projected to the steps
    ``cfg`` asks for. A stage the probes did not time (absent from either run) is refused: its cost is unknown."""
    check_probe_steps(small, large)
    estimates = []
    for stage, field in STAGE_STEPS.items():
        if stage not in runs[0] or stage not in runs[1]:
            raise ZooBuildError(f"the probe builds recorded no time for stage '{stage}'")
        t_small, t_large = runs[0][stage], runs[1][stage]
        per_step = max(0.0, (t_large - t_small) / (large - small))
        estimates.append(StageEstimate(stage, int(getattr(cfg, field)), per_step, t_small - small * per_step,
                                       (t_small, t_large)))
    return estimates


def estimate_build(cfg: ZooConfig, probe_steps: tuple[int, int] = DEFAULT_PROBE_STEPS,
                   scratch: str | Path | None = None) -> dict:
    """Project ``cfg``'s build time on this machine from two short probe builds (module docstring).

    Returns the JSON record: per stage its configured steps, fitted seconds a step and fixed seconds, probe
    times and projection; ``other_seconds`` (corpus render and the rest no stage records, the larger probe's);
    ``projected_seconds`` and ``projected_minutes`` in all; the probes' own wall time. Labels are not included
    (``diffmem zoo label`` is timed by ``zoo.json``'s ``labels.seconds``)."""
    small, large = probe_steps
    check_probe_steps(small, large)  # before minutes of probe builds, not after
    started = time.perf_counter()
    runs, walls = [], []
    with tempfile.TemporaryDirectory(prefix="diffmem-estimate-", dir=scratch) as tmp:
        # a 1-step build first, discarded: the process's one-time costs (kernel selection, allocator growth) would
        # otherwise land on the small probe alone and bend the line's slope down
        _timed_build(probe_config(cfg, 1), Path(tmp) / "warm-up")
        for steps in (small, large):
            by_stage, wall = _timed_build(probe_config(cfg, steps), Path(tmp) / f"probe-{steps}")
            runs.append(by_stage)
            walls.append(wall)
    stages = fit_stages(cfg.train, small, large, (runs[0], runs[1]))
    other = max(0.0, walls[1] - sum(runs[1].values()))
    total = sum(s.projected_seconds for s in stages) + other + runs[1].get("save", 0.0)
    return {
        "benchmark": "zoo-estimate", "corpus": cfg.corpus_name, "config": cfg.to_dict(), "probe_steps": [small, large],
        "stages": {s.stage: {"steps": s.steps, "seconds_per_step": round(s.seconds_per_step, 4),
                             "fixed_seconds": round(s.fixed_seconds, 1),
                             "probe_seconds": [round(t, 1) for t in s.probe_seconds],
                             "projected_seconds": round(s.projected_seconds, 1)} for s in stages},
        "other_seconds": round(other, 1), "save_seconds": round(runs[1].get("save", 0.0), 1),
        "projected_seconds": round(total, 1), "projected_minutes": round(total / 60, 1),
        "probe_wall_seconds": round(time.perf_counter() - started, 1),
    }
