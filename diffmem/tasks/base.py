"""Benchmark tasks: the object that owns a benchmark's data, so that bench and extract stay general.

Modelled on lm-evaluation-harness's ``Task``: a task says where the prompts come from and how they
split, which training images a generation is matched against, how a match is labelled and how
prompt fidelity is read. ``diffmem bench`` (:mod:`diffmem.bench`) only calls this interface; the zoo
is one task (:class:`~diffmem.tasks.zoo.ZooTask`), a user's checkpoint with a memorized list, an
ordinary list and an optional image folder is another (:class:`~diffmem.tasks.folder.FolderTask`).

Splits (the held-out protocol):

- ``fit``: memorized prompts a mitigator may see (with ``ordinary_fit`` as its reference prompts);
- ``dev``: memorized prompts (and ``ordinary_dev``) on which method settings are chosen;
- ``test``: memorized prompts (and ``ordinary_test``) on which the table is reported.

The three memorized splits are disjoint, and so are the three ordinary ones.

Add a task by subclassing :class:`BenchTask` with ``@TASKS.register("name")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffmem.attacks.base import TrainingIndex
from diffmem.errors import DiffmemError
from diffmem.registry import Registry

TASKS: Registry[BenchTask] = Registry("task")


@dataclass(frozen=True)
class MemorizedPrompt:
    """A memorized prompt and its own training item in the task's index (``None`` when unknown)."""

    caption: str
    item: int | None = None


@dataclass(frozen=True)
class SplitSizes:
    """How many prompts each split holds (at most; a small task fills fit first, then test, then dev)."""

    fit: int = 40
    dev: int = 24
    test: int = 40
    ordinary_fit: int = 128
    ordinary_dev: int = 32
    ordinary_test: int = 64


@dataclass
class TaskSplits:
    """One seed's disjoint fit / dev / test splits of memorized and of ordinary prompts."""

    seed: int
    fit: list[MemorizedPrompt]
    dev: list[MemorizedPrompt]
    test: list[MemorizedPrompt]
    ordinary_fit: list[str]
    ordinary_dev: list[str]
    ordinary_test: list[str]

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, **{k: len(getattr(self, k)) for k in
                                      ("fit", "dev", "test", "ordinary_fit", "ordinary_dev", "ordinary_test")}}


def split_by_seed(memorized: list[MemorizedPrompt], ordinary: list[str], seed: int, sizes: SplitSizes
                  ) -> TaskSplits:
    """Shuffle with ``seed`` and cut disjoint splits; with few prompts, fit and test are filled before dev."""
    rng = np.random.default_rng(seed)
    mem = [memorized[i] for i in rng.permutation(len(memorized))]
    ordi = [ordinary[i] for i in rng.permutation(len(ordinary))]

    def cut(items: list, n_fit: int, n_dev: int, n_test: int) -> tuple[list, list, list]:
        if len(items) < 2:
            raise DiffmemError(f"a task needs at least 2 prompts per list to split them, got {len(items)}")
        n_fit = min(n_fit, max(1, len(items) // 2))
        n_test = min(n_test, len(items) - n_fit)
        n_dev = min(n_dev, len(items) - n_fit - n_test)
        return items[:n_fit], items[n_fit + n_test: n_fit + n_test + n_dev], items[n_fit: n_fit + n_test]

    fit, dev, test = cut(mem, sizes.fit, sizes.dev, sizes.test)
    ofit, odev, otest = cut(ordi, sizes.ordinary_fit, sizes.ordinary_dev, sizes.ordinary_test)
    return TaskSplits(seed, fit, dev, test, ofit, odev, otest)


@dataclass
class ExtractionLabels:
    """Per-generation labels: any match above the threshold, and whether it is the prompt's own item."""

    hit: np.ndarray  # (N,) bool
    own: np.ndarray  # (N,) bool, hit and the match is the prompt's own training item

    def rates(self) -> dict[str, float]:
        return {"extraction_rate": float(self.hit.mean()), "matching_verbatim": float(self.own.mean()),
                "template_verbatim": float((self.hit & ~self.own).mean())}


def label_matches(index: TrainingIndex, images: torch.Tensor, own_items: list[int | None]) -> ExtractionLabels:
    """The default extraction labeller: nearest training image above the index's threshold."""
    m = index.matcher.match(images)
    hit = (m.similarity > index.threshold).numpy()
    items = index.item_of_image[m.index.numpy()]
    own = np.array([o is not None and it == o for it, o in zip(items.tolist(), own_items)], dtype=bool)
    return ExtractionLabels(hit, hit & own)


@dataclass
class BenchTask(ABC):
    """What a benchmark needs from its data; every method has a general default except the splits."""

    name: ClassVar[str] = "task"
    _index: TrainingIndex | None = field(default=None, init=False, repr=False)

    @abstractmethod
    def splits(self, seed: int, sizes: SplitSizes = SplitSizes()) -> TaskSplits:
        """Disjoint fit / dev / test splits for ``seed``."""

    @abstractmethod
    def build_index(self, model) -> TrainingIndex:
        """The training images generations are matched against, with the task's threshold."""

    def training_index(self, model) -> TrainingIndex:
        """:meth:`build_index`, built once."""
        if self._index is None:
            self._index = self.build_index(model)
        return self._index

    def label_extraction(self, model, images: torch.Tensor, own_items: list[int | None]) -> ExtractionLabels:
        """Which generations replicate a training image (``own_items``: one per image)."""
        return label_matches(self.training_index(model), images, own_items)

    def statistics_prompts(self, split: TaskSplits) -> list[str]:
        """Prompts of the memorized captions' own distribution that are not memorized, for methods that take
        activation statistics from them (NeMo's z-scores: the reference used 50k LAION prompts). A task that
        knows its captions' families returns never-trained captions of the fit split's families; the default
        is the ordinary fit split (all a task made of two prompt lists knows)."""
        return list(split.ordinary_fit)

    def fidelity(self, images: torch.Tensor, captions: list[str]) -> dict[str, float | None]:
        """Prompt fidelity per caption family (share of generations that draw what the caption names);
        ``{}`` when the task has no fidelity metric."""
        return {}

    def content_flags(self, images: torch.Tensor, captions: list[str]) -> np.ndarray | None:
        """Per image, whether it draws what its caption names (the per-image form of :meth:`fidelity`), or
        ``None`` when the task cannot say."""
        return None

    def fid_features(self) -> nn.Module | None:
        """Feature extractor for FID, or ``None`` (no FID)."""
        return None

    def fid_reference(self, model) -> torch.Tensor | None:
        """Real images FID compares ordinary generations with, or ``None``."""
        return None

    def oracle_surrogates(self, prompts: list[MemorizedPrompt]) -> torch.Tensor:
        """Non-replicating images drawn from each prompt's ground truth (only a synthetic task can)."""
        raise DiffmemError(f"task {self.name!r} has no ground-truth renderer for oracle surrogates")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def make_task(name: str, **options: Any) -> BenchTask:
    import diffmem.tasks  # noqa: F401 - registers the built-ins

    return TASKS.create(name, **options)
