"""Extraction attacks: one registry, one file per attack (see base.py for how to add one)."""

from diffmem.attacks import (  # noqa: F401 - registers the built-ins
    dori,
    generate_filter,
    one_step_blackbox,
    one_step_whitebox,
    replication,
    retrigger,
)
from diffmem.attacks.base import ATTACKS, Attack, AttackContext, TrainingIndex, make_attack

__all__ = ["ATTACKS", "Attack", "AttackContext", "TrainingIndex", "make_attack"]
