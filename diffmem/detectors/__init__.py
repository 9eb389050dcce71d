"""Memorization detectors: one registry, one file per method (see base.py for how to add one)."""

from diffmem.detectors import anisotropy, attention_entropy, combined, deepssim, noise_norm, sharpness  # noqa: F401 - register the built-ins
from diffmem.detectors.base import DETECTORS, Detector, NoiseStepDetector, PromptDetector, make_detector
from diffmem.detectors.engine import NoiseStepBatch, NoiseStepEngine

__all__ = ["DETECTORS", "Detector", "NoiseStepBatch", "NoiseStepDetector", "NoiseStepEngine", "PromptDetector",
           "make_detector"]
