"""The SD-like zoo (``zoo:sd``, the default zoo) as a benchmark task.

Everything but fidelity is :class:`~diffmem.tasks.zoo.ZooTask`'s, read from the SD-like zoo's folder: the
memorized prompts are its signature and template captions labelled memorized by extraction, the ordinary ones
its generic captions, generations are matched against its training images through its VAE.

Fidelity is the after-training gates' metric (:func:`~diffmem.zoo.sd_attributes.shows_named`): a generation
is faithful when the zoo's attribute reader reads back every factor its caption names (shape, colour,
position, size, style; unnamed factors are free). Families: ``ordinary`` (generic captions, which name one to
four factors) and ``title`` (signature and template titles, which name the style: a mitigated model should
still draw a poster for a poster's title). FID features: the same reader's penultimate layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from diffmem.errors import DiffmemError
from diffmem.tasks.base import TASKS, MemorizedPrompt
from diffmem.tasks.zoo import ORDINARY_KINDS, ZooTask, fidelity_by_family

SD_FIDELITY_FAMILIES = ("ordinary", "title")


@TASKS.register("zoo-sd")
@dataclass
class SDZooTask(ZooTask):
    """The SD-like zoo's task: :class:`ZooTask`'s prompts, splits and index, fidelity by named-factor read-back."""

    name = "zoo-sd"
    corpus: ClassVar[str] = "sd"
    _named: dict[str, tuple[str, Any]] | None = field(default=None, init=False, repr=False)
    _reader: Any = field(default=None, init=False, repr=False)

    def _caption_table(self) -> dict[str, tuple[str, Any]]:
        """caption -> (fidelity family, :class:`~diffmem.zoo.sd_corpus.Named`), from the zoo's corpus."""
        if self._named is None:
            from diffmem.zoo.load import load_corpus

            self._named = {it.caption: ("ordinary" if it.kind in ORDINARY_KINDS else "title", it.named)
                           for it in load_corpus(self.folder())}
        return self._named

    def _attribute_reader(self):
        if self._reader is None:
            from diffmem.zoo.sd_attributes import SDAttributeReader

            self._reader = SDAttributeReader.load(self.folder() / "attribute_reader")
        return self._reader

    def _lookup(self, captions: list[str]) -> list[tuple[str, Any]]:
        table = self._caption_table()
        missing = [c for c in captions if c not in table]
        if missing:
            raise DiffmemError(f"caption '{missing[0]}' is not in the zoo at '{self.folder()}'; task '{self.name}' "
                               "reads fidelity only for the zoo's own captions")
        return [table[c] for c in captions]

    def content_flags(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Per image: the reader reads back every factor its caption names."""
        from diffmem.zoo.sd_attributes import shows_named

        return shows_named(self._attribute_reader(), images, [named for _, named in self._lookup(captions)])

    def fidelity(self, images: torch.Tensor, captions: list[str]) -> dict[str, float | None]:
        """Share of faithful generations per family (``ordinary``, ``title``; ``None`` when absent) and ``all``."""
        families = [family for family, _ in self._lookup(captions)]
        return fidelity_by_family(self.content_flags(images, captions), families, SD_FIDELITY_FAMILIES)

    def fid_features(self):
        """The reader's penultimate layer. On this zoo FID in these features fails the sanity check of
        ``benchmarks/extraction.py`` (it falls as noise damages the UNet: docs/extraction.md), so this task's
        quality figure is :meth:`fidelity`; FID is still computed for parity with other tasks."""
        from diffmem.eval.quality import ReaderFeatures

        return ReaderFeatures(self._attribute_reader())

    def oracle_surrogates(self, prompts: list[MemorizedPrompt]) -> torch.Tensor:
        raise DiffmemError(f"task '{self.name}' has no oracle surrogates (the collapse zoo's ablation); use the "
                           "model's own surrogates (--surrogates model)")

    def fidelity_description(self) -> str:
        return ("attribute reader reads back every factor the caption names (ordinary: generic captions; title: "
                "signature and template titles, which name the style)")
