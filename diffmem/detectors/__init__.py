"""Memorization detectors: one registry, one file per method (see base.py for how to add one)."""

from diffmem.detectors import (  # noqa: F401 - register the built-ins
    anisotropy,
    attention_entropy,
    combined,
    deepssim,
    neighbour_ratio,
    noise_norm,
    sharpness,
)
from diffmem.detectors.base import DETECTORS, Detector, NoiseStepDetector, PromptDetector, make_detector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine

__all__ = ["DETECTORS", "Detector", "NoiseStepBatch", "NoiseStepDetector", "NoiseStepEngine", "PromptDetector",
           "make_detector"]
