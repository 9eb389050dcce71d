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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_text
from diffmem.jobs import versions
from diffmem.models.checkpoint import write_checkpoint
from diffmem.models.model import DiffusionModel
from diffmem.outputs import check_output_dir, staged
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

    @property
    def output_command(self) -> str:
        """What this method's output folder is marked as (``mitigate nemo``): an output of one method is never
        reused, resumed or forced into by another (a fine-tuned checkpoint must not get an inference config)."""
        return mitigate_command(self.name)


def fit_with(mitigator: Mitigator, model: DiffusionModel, memorized: list[str], ordinary: list[str],
             **available: Any) -> None:
    """``mitigator.fit`` with those of the ``available`` keyword inputs its ``fit`` accepts (``None`` values are
    left out): callers hold optional inputs (a training index, statistics prompts, a content check) that only
    some methods take, and pass them all without knowing which method takes what."""
    import inspect

    accepted = inspect.signature(mitigator.fit).parameters
    mitigator.fit(model, memorized, ordinary,
                  **{k: v for k, v in available.items() if k in accepted and v is not None})


def mitigate_command(name: str) -> str:
    """The ownership-marker command of ``diffmem mitigate NAME`` (see :mod:`diffmem.outputs`)."""
    return f"mitigate {name}"


def check_prompt_lists(memorized: list[str], ordinary: list[str], needs_memorized: bool = True,
                       ordinary_needed: bool = True) -> None:
    if needs_memorized and not memorized:
        raise DiffmemError("the prompt list holds no memorized prompts: this method needs prompts that replicate "
                           "(label them, or flag them with `diffmem scan` first)")
    if ordinary_needed and not ordinary:
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

    def save(self, out_dir: str | Path, model: DiffusionModel, force: bool = False) -> Path:
        """Write ``mitigation.json`` into ``out_dir``: what ``--mitigation FILE`` of scan, extract and
        sample re-applies (see :func:`load_mitigation`). Returns the file's path."""
        out = Path(out_dir)
        check_output_dir(out, self.output_command, [model.folder], force, writes=[MITIGATION_FILE])
        record = {"mitigator": self.config(), "acts_at": self.acts_at, "fit": self.describe_fit(),
                  "model": model.describe(), "versions": versions(),
                  "use": f"diffmem scan|extract|sample --model {model.folder or '<the model>'} --mitigation "
                         f"{out / MITIGATION_FILE}"}
        with staged(out, self.output_command) as staging:
            atomic_write_text(staging / MITIGATION_FILE, json.dumps(record, indent=2, default=str))
        return out / MITIGATION_FILE


@dataclass
class WeightMitigator(Mitigator):
    acts_at: ClassVar[str] = "weights"

    @abstractmethod
    def patched(self) -> DiffusionModel:
        """The model with edited weights (valid after ``fit``)."""

    def edited_components(self) -> tuple[str, ...]:
        return ("unet",)

    def save(self, out_dir: str | Path, model: DiffusionModel, force: bool = False) -> Path:
        """Write a new pipeline folder with the edited components (:func:`diffmem.models.checkpoint.write_checkpoint`:
        the input folder is never written to, edited components keep the input's stored dtype)."""
        patched = self.patched()
        edited = self.edited_components()
        record = {"mitigator": self.config(), "acts_at": self.acts_at, "fit": self.describe_fit(),
                  "input_model": model.describe(), "edited_components": list(edited), "versions": versions()}
        return write_checkpoint(out_dir, model, {name: getattr(patched, name) for name in edited},
                                self.output_command, MITIGATION_FILE, record, force)


def clone_model(model: DiffusionModel, components: tuple[str, ...] = ("unet",)) -> DiffusionModel:
    """A model sharing everything but deep copies of ``components`` (so edits never touch the original)."""
    view = copy.copy(model)
    for name in components:
        setattr(view, name, copy.deepcopy(getattr(model, name)))
    view._fingerprint = None
    view.folder = None
    view.source = f"{model.source} (patched)"
    return view


def load_mitigation(path: str | Path) -> InferenceMitigator:
    """The inference-time mitigator saved in a ``mitigation.json`` by ``diffmem mitigate`` (fit state
    included: it is part of the saved options), ready for ``.apply(model)``; its ``fitted_on`` attribute is
    the fingerprint of the model it was fitted on (None in a file that does not record it), see
    :func:`mitigation_mismatch`."""
    path = Path(path)
    if path.is_dir():
        path = path / MITIGATION_FILE
    if not path.is_file():
        raise DiffmemError(f"--mitigation '{path}' does not exist; expected the mitigation.json written by "
                           "`diffmem mitigate METHOD --out DIR`")
    try:
        record = json.loads(path.read_text())
        config = dict(record["mitigator"])
        name = config.pop("name")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DiffmemError(f"--mitigation '{path}' is not a mitigation.json of `diffmem mitigate` "
                           f"({type(exc).__name__}: {exc})") from exc
    if record.get("acts_at") != "inference":
        raise DiffmemError(f"--mitigation '{path}' describes a patched checkpoint ({name}); load the patched "
                           "folder with --model instead")
    try:
        mitigator = make_mitigator(name, **config)
    except (KeyError, TypeError) as exc:
        raise DiffmemError(f"--mitigation '{path}': {str(exc).strip(chr(34) + chr(39))}") from exc
    model = record.get("model")
    mitigator.fitted_on = model.get("fingerprint") if isinstance(model, dict) else None  # not an option: no field
    mitigator.path = str(path)
    return mitigator


def mitigation_mismatch(mitigation: InferenceMitigator, fingerprint: str) -> str | None:
    """What is wrong with applying ``mitigation`` (from :func:`load_mitigation`) to the model of ``fingerprint``:
    None when it was fitted on that model (or its file does not say), else one sentence naming both models."""
    fitted_on = getattr(mitigation, "fitted_on", None)
    if fitted_on is None or fitted_on == fingerprint:
        return None
    return (f"--mitigation '{getattr(mitigation, 'path', '?')}' was fitted on the model of fingerprint {fitted_on}, "
            f"not on this one ({fingerprint}); its fit (e.g. a target embedding) belongs to that model")


def make_mitigator(name: str, **options: Any) -> Mitigator:
    import diffmem.mitigators  # noqa: F401 - registers the built-ins

    return MITIGATORS.create(name, **options)
