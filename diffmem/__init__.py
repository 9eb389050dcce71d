"""diffmem: find and remove training-data memorization in text-to-image diffusion models."""

__version__ = "0.1.0"
