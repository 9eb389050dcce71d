"""The detector contract and registry.

A detector maps prompts to one memorization score each (higher = more likely to replicate). Two
kinds share the model's forward passes through :class:`~diffmem.detectors.engine.NoiseStepEngine`:

- :class:`NoiseStepDetector`: reads epsilon predictions at the pure-noise latent x_T for chosen
  timesteps (conditional per prompt, unconditional once per noise draw), computed by the engine
  for all such detectors at once;
- :class:`PromptDetector`: runs its own passes (sampling trajectories, generated images) through
  the model layer.

Add a detector by subclassing one of them in its own file and decorating it with
``@DETECTORS.register("name")``; ``diffmem scan --detector name`` then finds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from diffmem.errors import DiffmemError
from diffmem.registry import Configurable, Registry

if TYPE_CHECKING:
    from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine
    from diffmem.models.model import DiffusionModel

DETECTORS: Registry[Detector] = Registry("detector")


@dataclass
class Detector(Configurable, ABC):
    """Base class: dataclass fields are the detector's settings (saved in every scan's provenance)."""

    name: ClassVar[str] = "detector"
    needs_reference: ClassVar[bool] = False  # standardises on ordinary ``reference_prompts`` (the CLI supplies them)

    def bind(self, model: DiffusionModel) -> None:  # noqa: B027 - optional hook
        """Called once with the model to be scanned, before ``config()`` is recorded: settings whose default
        depends on the model (e.g. whose training images to compare with) resolve here."""

    def prepare(self, engine: NoiseStepEngine) -> None:  # noqa: B027 - optional hook
        """Called once before scoring (e.g. to calibrate on reference prompts)."""

    @abstractmethod
    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        """UNet forward passes (per batch element) this detector costs per prompt, for the benchmark table."""


def unbound_error(detector: str, needs: str, option: str) -> DiffmemError:
    """The one-line refusal of a detector asked to score before :meth:`Detector.bind` resolved whose ``needs``
    (training images, an embedder) to use: guessing the default zoo's would score against another model's data."""
    return DiffmemError(f"{detector} needs {needs} and was neither bound to the scanned model (bind(model); run_scan "
                        f"and the benchmarks do) nor given --option {detector}.{option}=FOLDER")


@dataclass
class NoiseStepDetector(Detector):
    """Scores from epsilon at x_T; declares which DDIM-schedule timestep indices it reads."""

    @abstractmethod
    def timestep_indices(self) -> tuple[int, ...]:
        """Indices into the engine's DDIM schedule (0 = first, high-noise step; -3 = third from last)."""

    @abstractmethod
    def score_batch(self, batch: NoiseStepBatch) -> torch.Tensor:
        """One score per prompt of the batch, shape ``(B,)``."""

    def attention_layers(self, engine: NoiseStepEngine) -> str | None:
        """Module-name pattern of cross-attention layers whose attention the engine should record (None: none)."""
        return None

    def unet_calls_per_prompt(self, engine: NoiseStepEngine) -> float:
        return float(len(set(self.timestep_indices())) * engine.n_draws)


@dataclass
class PromptDetector(Detector):
    """A detector that runs its own forward passes for a batch of prompt embeddings."""

    @abstractmethod
    def score_prompts(self, model: DiffusionModel, embeddings: torch.Tensor, engine: NoiseStepEngine,
                      prompt_ids: list[int] | None = None) -> torch.Tensor:
        """One score per prompt, shape ``(B,)``; ``prompt_ids`` (indices in the prompt file) seed each prompt's
        noise when the engine draws a seed per prompt."""


def score_embeddings(engine: NoiseStepEngine, detectors: list[Detector], embeddings: torch.Tensor,
                     prompt_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Every detector's scores for a batch of prompt embeddings; noise-step detectors share one engine pass.
    ``prompt_ids``: the prompts' indices in their file (needed when the engine draws a seed per prompt)."""
    step_dets = [d for d in detectors if isinstance(d, NoiseStepDetector)]
    out: dict[str, torch.Tensor] = {}
    if step_dets:
        patterns = sorted({p for d in step_dets if (p := d.attention_layers(engine)) is not None})
        batch = engine.run(embeddings, {i for d in step_dets for i in d.timestep_indices()},
                           (patterns[0] if len(patterns) == 1 else "|".join(f"(?:{p})" for p in patterns)) or None,
                           prompt_ids)
        for d in step_dets:
            out[d.name] = d.score_batch(batch)
    for d in detectors:
        if isinstance(d, PromptDetector):
            out[d.name] = d.score_prompts(engine.model, embeddings, engine, prompt_ids)
    return out


def make_detector(name: str, **options: Any) -> Detector:
    """Instantiate a registered detector; unknown options raise a ``TypeError`` naming them."""
    import diffmem.detectors  # noqa: F401 - registers the built-in detectors

    return DETECTORS.create(name, **options)
