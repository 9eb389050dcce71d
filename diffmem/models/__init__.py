"""The model layer: one loader for the zoo and local Stable Diffusion 1.x/2.x folders."""

from diffmem.models.loader import load_model
from diffmem.models.model import DiffusionModel, SampleOutput, check_finite

__all__ = ["DiffusionModel", "SampleOutput", "check_finite", "load_model"]
