"""The extraction-attack contract and registry.

An attack takes prompts (and, for white-box attacks, the model's internals) and returns per-prompt
columns: at least ``score`` (higher = more likely extracted) and ``flagged``. Attacks that produce
images also report their best match in the training set through an
:class:`~diffmem.eval.matching.Matcher`: ``match_similarity``, ``match_item`` and ``match_label``
(``matching_verbatim`` when the match is the prompt's own training item, ``template_verbatim`` when it
is another item's, ``unattributed`` when the prompt's own item is not known, so whose image it is cannot be
said, ``none`` below the matcher threshold).

Add an attack by subclassing :class:`Attack` in its own file with ``@ATTACKS.register("name")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from diffmem.eval.matching import Matcher
from diffmem.models.model import DiffusionModel
from diffmem.registry import Configurable, Registry

ATTACKS: Registry[Attack] = Registry("attack")
LABELS = ("matching_verbatim", "template_verbatim", "unattributed", "none")


@dataclass
class TrainingIndex:
    """The training set an attacker matches against: images, their item ids, and a fitted matcher."""

    images: torch.Tensor  # (M, 3, H, W) in [0, 1]
    item_of_image: np.ndarray  # (M,)
    matcher: Matcher
    threshold: float

    def label(self, similarity: torch.Tensor, image_index: torch.Tensor, own_items: list[int | None]) -> list[str]:
        items = self.item_of_image[image_index.numpy()]
        out = []
        for s, it, own in zip(similarity.tolist(), items.tolist(), own_items):
            if s <= self.threshold:
                out.append("none")
            elif own is None:  # no own item given: another caption's image or its own, unknown
                out.append("unattributed")
            else:
                out.append("matching_verbatim" if it == own else "template_verbatim")
        return out


@dataclass
class AttackContext:
    """What an attack may use besides the model: the training index and each prompt's own item."""

    index: TrainingIndex | None = None
    own_items: list[int | None] = field(default_factory=list)
    seed: int = 0


@dataclass
class Attack(Configurable, ABC):
    """Base class: dataclass fields are the attack's settings (saved in provenance)."""

    name: ClassVar[str] = "attack"
    needs_white_box: ClassVar[bool] = False

    @abstractmethod
    def run(self, model: DiffusionModel, prompts: list[str], ctx: AttackContext) -> dict[str, list | np.ndarray]:
        """Per-prompt columns, each of length ``len(prompts)``; must include ``score`` and ``flagged``."""

    @abstractmethod
    def unet_calls_per_prompt(self) -> float:
        """UNet batch elements per prompt (the attack's cost)."""

    def match_images(self, images: torch.Tensor, per_prompt: int, ctx: AttackContext,
                     use: torch.Tensor | None = None) -> dict[str, list]:
        """Best training match over each prompt's ``per_prompt`` images (only those where ``use`` is True)."""
        n = len(images) // per_prompt
        if ctx.index is None:
            return {}
        m = ctx.index.matcher.match(images)
        sim = m.similarity.view(n, per_prompt).clone()
        if use is not None:
            sim[~use.view(n, per_prompt)] = -float("inf")
        best = sim.argmax(1)
        rows = torch.arange(n) * per_prompt + best
        best_sim, best_img = m.similarity[rows], m.index[rows]
        best_sim = torch.where(torch.isinf(sim.max(1).values), torch.full_like(best_sim, float("nan")), best_sim)
        labels = ctx.index.label(torch.nan_to_num(best_sim, nan=-1.0), best_img, ctx.own_items or [None] * n)
        return {"match_similarity": best_sim.tolist(),
                "match_item": ctx.index.item_of_image[best_img.numpy()].tolist(),
                "match_label": labels,
                "replication_rate": (m.similarity.view(n, per_prompt) > ctx.index.threshold).float().mean(1).tolist()}


def make_attack(name: str, **options: Any) -> Attack:
    import diffmem.attacks  # noqa: F401 - registers the built-ins

    return ATTACKS.create(name, **options)
