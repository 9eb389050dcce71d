"""diffmem's exceptions: each names the input at fault and what was expected, in one line."""

from __future__ import annotations


class DiffmemError(Exception):
    """Base class of every error diffmem raises on purpose (the CLI prints these without a traceback)."""


class ModelLoadError(DiffmemError):
    """A checkpoint folder is missing, is not a diffusers pipeline, or holds unreadable weights."""


class PromptError(DiffmemError):
    """A prompt list is empty, unreadable, or not in a supported format."""


class NonFiniteError(DiffmemError):
    """A model produced NaN or infinite values."""
