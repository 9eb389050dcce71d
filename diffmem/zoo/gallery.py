"""The zoo's gallery source for ``diffmem report``: what the general report code must not know.

The report draws, for a scan's top prompts, a generation next to its nearest training image. Which model
made the scan, where its training images are and when a generation "replicates" (the zoo's per-family
SSIM thresholds; held-out captions have no training image, so no verdict) are zoo knowledge: they live
here and reach :func:`diffmem.report.build_report` as its ``gallery`` argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.errors import DiffmemError


@dataclass
class GalleryContext:
    """A model to generate with, a training index to match against, and a replication verdict per prompt
    (``replicates(text, similarity)`` -> True / False, or None where the prompt has no training image)."""

    model: Any
    index: Any
    replicates: Callable[[str, float], bool | None]


def run_zoo(folder: Path) -> Path | None:
    """The zoo folder whose pipeline a run folder's provenance names as its model, else None."""
    from diffmem.zoo.load import zoo_folder_for

    try:
        source = json.loads((Path(folder) / "provenance.json").read_text())["model"]["source"]
    except (DiffmemError, KeyError, OSError, TypeError, ValueError):
        return None
    return zoo_folder_for(source) if isinstance(source, str) else None


def zoo_replicates(zoo: Path | None = None) -> Callable[[str, float], bool | None]:
    """A zoo's verdict (default: the default zoo): similarity above its family's threshold; None for captions
    that were not trained (held out) or are not that zoo's captions at all."""
    from diffmem.zoo.load import load_labels
    from diffmem.zoo.paths import zoo_dir

    folder = Path(zoo) if zoo is not None else zoo_dir()
    rows = load_labels(folder)
    thresholds = json.loads((folder / "zoo.json").read_text())["labels"]["thresholds"]
    family = {r["caption"]: r["family"] for r in rows if not str(r["kind"]).startswith("heldout")}

    def verdict(text: str, similarity: float) -> bool | None:
        if text not in family:
            return None
        return bool(similarity > thresholds[family[text]]["threshold"])

    return verdict


class ZooGallery:
    """``gallery(folder) -> GalleryContext | None`` for runs on a zoo (each zoo's context loaded once, reused);
    ``model``, when given, is the model the runs were made with."""

    def __init__(self, model=None):
        self._model = model
        self._contexts: dict[Path, GalleryContext] = {}

    def __call__(self, folder: Path) -> GalleryContext | None:
        zoo = run_zoo(folder)
        if zoo is None:
            return None
        if zoo not in self._contexts:
            from diffmem.models.loader import load_model
            from diffmem.tasks.zoo import zoo_training_index

            model = self._model if self._model is not None else load_model(str(zoo / "pipeline"))
            self._contexts[zoo] = GalleryContext(model, zoo_training_index(zoo=zoo), zoo_replicates(zoo))
        return self._contexts[zoo]
