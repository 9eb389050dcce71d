"""Mitigators: one registry, one file per method, split by where they act (see base.py)."""

from diffmem.mitigators import (  # noqa: F401 - register the built-ins
    adversarial_finetune,
    embedding_noise,
    nemo,
    prompt_adaptation,
    random_tokens,
    subspace_pruning,
)
from diffmem.mitigators.base import (
    MITIGATORS,
    InferenceMitigator,
    Mitigator,
    WeightMitigator,
    make_mitigator,
)

__all__ = ["MITIGATORS", "InferenceMitigator", "Mitigator", "WeightMitigator", "make_mitigator"]
