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


def _zoo_training_index():
    try:  # the task module, where the zoo's index lives once the tasks refactor lands
        from diffmem.tasks.zoo import zoo_training_index
    except ImportError:
        from diffmem.extract import zoo_training_index
    return zoo_training_index()


def ran_on_zoo(folder: Path) -> bool:
    """Whether a run folder's provenance names the embedded zoo's pipeline as its model."""
    from diffmem.zoo.paths import zoo_pipeline_path

    try:
        source = json.loads((Path(folder) / "provenance.json").read_text())["model"]["source"]
        return Path(source) == zoo_pipeline_path().resolve()
    except (DiffmemError, KeyError, OSError, TypeError, ValueError):
        return False


def zoo_replicates() -> Callable[[str, float], bool | None]:
    """The zoo's verdict: similarity above its family's threshold (single objects need a near-exact copy);
    None for captions that were not trained (held out) or are not zoo captions at all."""
    from diffmem.zoo.load import load_labels
    from diffmem.zoo.paths import zoo_dir

    thresholds = json.loads((zoo_dir() / "zoo.json").read_text())["labels"]["thresholds"]
    family = {r["caption"]: r["family"] for r in load_labels(zoo_dir()) if not str(r["kind"]).startswith("heldout")}

    def verdict(text: str, similarity: float) -> bool | None:
        if text not in family:
            return None
        return bool(similarity > thresholds[family[text]]["threshold"])

    return verdict


class ZooGallery:
    """``gallery(folder) -> GalleryContext | None`` for runs on the zoo (loaded once, reused)."""

    def __init__(self, model=None):
        self._model = model
        self._context: GalleryContext | None = None

    def __call__(self, folder: Path) -> GalleryContext | None:
        if not ran_on_zoo(folder):
            return None
        if self._context is None:
            from diffmem.models.loader import load_model

            model = self._model if self._model is not None else load_model()
            self._context = GalleryContext(model, _zoo_training_index(), zoo_replicates())
        return self._context
