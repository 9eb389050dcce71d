"""Extraction attacks: one registry, one file per attack (see base.py for how to add one)."""

from diffmem.attacks import generate_filter, one_step_blackbox, one_step_whitebox, retrigger  # noqa: F401
from diffmem.attacks.base import ATTACKS, Attack, AttackContext, TrainingIndex, make_attack

__all__ = ["ATTACKS", "Attack", "AttackContext", "TrainingIndex", "make_attack"]
