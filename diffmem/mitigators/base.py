"""The mitigator contract and registry, split by where a method acts.

- :class:`InferenceMitigator` changes how prompts are encoded or sampled; ``apply(model)`` returns a
  patched *view* of the model (same weights, same API), so every detector, attack and metric runs on
  it unchanged. ``save`` writes a small JSON config the other commands can re-apply.
- :class:`WeightMitigator` edits weights: ``fit`` computes the edit on memorized and ordinary prompts,
  ``save`` writes a *new* checkpoint folder (same tensor shapes, so ``load_model`` reads it) with a
  provenance JSON. The input folder is never written to.

Add one by subclassing in its own file with ``@MITIGATORS.register("name")``.
"""

from __future__ import annotations

import copy
import json
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_text
from diffmem.jobs import versions
from diffmem.models.model import DiffusionModel
from diffmem.registry import Configurable, Registry

MITIGATORS: Registry[Mitigator] = Registry("mitigator")
MITIGATION_FILE = "mitigation.json"


@dataclass
class Mitigator(Configurable, ABC):
    name: ClassVar[str] = "mitigator"
    acts_at: ClassVar[str] = "inference"

    def fit(self, model: DiffusionModel, memorized: list[str], ordinary: list[str]) -> None:  # noqa: B027
        """Compute whatever the method needs from memorized and ordinary prompts (optional)."""

    def describe_fit(self) -> dict[str, Any]:
        return {}


def check_prompt_lists(memorized: list[str], ordinary: list[str], needs_memorized: bool = True) -> None:
    if needs_memorized and not memorized:
        raise DiffmemError("the prompt list holds no memorized prompts: this method needs prompts that replicate "
                           "(label them, or flag them with `diffmem scan` first)")
    if not ordinary:
        raise DiffmemError("no ordinary (non-memorized) reference prompts given; the method needs them to "
                           "tell memorization from ordinary behaviour")


class PatchedModel(DiffusionModel):
    """A view of a model sharing its modules, with some methods replaced by a mitigator."""

    @classmethod
    def of(cls, model: DiffusionModel) -> PatchedModel:
        view = copy.copy(model)
        view.__class__ = cls
        return view


@dataclass
class InferenceMitigator(Mitigator):
    acts_at: ClassVar[str] = "inference"

    @abstractmethod
    def apply(self, model: DiffusionModel) -> DiffusionModel:
        """A patched view of ``model``; ``model`` itself is unchanged."""

    def save(self, out_dir: str | Path, model: DiffusionModel) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"mitigator": self.config(), "acts_at": self.acts_at, "fit": self.describe_fit(),
                  "model": model.describe(), "versions": versions()}
        return atomic_write_text(out / MITIGATION_FILE, json.dumps(record, indent=2, default=str))


@dataclass
class WeightMitigator(Mitigator):
    acts_at: ClassVar[str] = "weights"

    @abstractmethod
    def patched(self) -> DiffusionModel:
        """The model with edited weights (valid after ``fit``)."""

    def edited_components(self) -> tuple[str, ...]:
        return ("unet",)

    def save(self, out_dir: str | Path, model: DiffusionModel) -> Path:
        """Write a new pipeline folder: edited components saved, the others copied from the input."""
        if model.folder is None:
            raise DiffmemError("saving a patched checkpoint needs a model loaded from a folder")
        out = Path(out_dir)
        if out.resolve() == model.folder.resolve():
            raise DiffmemError(f"--out '{out}' is the input checkpoint; patched checkpoints never overwrite it")
        staging = out.with_name(out.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        edited = self.edited_components()
        shutil.copytree(model.folder, staging, ignore=lambda d, names: [n for n in names if Path(d) == model.folder
                                                                       and n in edited])
        patched = self.patched()
        for name in edited:
            module = getattr(patched, name)
            module.save_pretrained(staging / name, safe_serialization=True)
        record = {"mitigator": self.config(), "acts_at": self.acts_at, "fit": self.describe_fit(),
                  "input_model": model.describe(), "edited_components": list(edited), "versions": versions()}
        atomic_write_text(staging / MITIGATION_FILE, json.dumps(record, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return out


def clone_model(model: DiffusionModel, components: tuple[str, ...] = ("unet",)) -> DiffusionModel:
    """A model sharing everything but deep copies of ``components`` (so edits never touch the original)."""
    view = copy.copy(model)
    for name in components:
        setattr(view, name, copy.deepcopy(getattr(model, name)))
    view._fingerprint = None
    view.folder = None
    view.source = f"{model.source} (patched)"
    return view


def make_mitigator(name: str, **options: Any) -> Mitigator:
    import diffmem.mitigators  # noqa: F401 - registers the built-ins

    return MITIGATORS.create(name, **options)


def no_grad_params(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
