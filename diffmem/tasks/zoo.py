"""The zoo as a benchmark task: the only place where zoo files are read for benchmarking.

The zoo (:mod:`diffmem.zoo`) knows everything a real checkpoint does not: which captions are
memorized (labels by extraction), their training images (rebuilt from seeds), a calibrated SSIM
threshold, an attribute reader, and the renderer that drew the training set. This task hands those to
the general benchmark through :class:`~diffmem.tasks.base.BenchTask`.

Fidelity (share of generations that draw what the caption names), per caption family:

- ``object`` (single-object captions, "a small red circle in the top left on a white background"):
  the attribute reader reads shape, colour and position back; all three must be right (the zoo's
  counterpart of CLIP score).
- ``scene`` (two-object captions of the memorized scenes, "a red circle in the top left and a blue
  square in the center on a gray background"): for every object the caption names, at least 25% of
  the pixels in a disc of radius 3 around its position must have the named colour (nearest colour of
  the palette, within distance 70 in 0-255 RGB); all objects must pass. Shape and background are not
  read (the reader was trained on single objects, and scene backgrounds are textured). How often it
  finds the named objects in the training images through the zoo's VAE, and objects of another
  caption: ``benchmarks/bench_task.py --scene-check``; ``tests/test_bench_task.py`` pins raw renders.

``oracle_surrogates`` draws fresh renders of a caption from its ground-truth spec: information no real
checkpoint has, kept only as an ablation (``--surrogates oracle``), never the default.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffmem.attacks.base import TrainingIndex
from diffmem.errors import DiffmemError
from diffmem.eval.matching import make_matcher
from diffmem.tasks.base import TASKS, BenchTask, MemorizedPrompt, SplitSizes, TaskSplits, split_by_seed

MEMORIZED_KINDS = ("signature", "template")
ORDINARY_KINDS = ("generic", "heldout_generic", "generic_scene")
SCENE_DISC_RADIUS = 3.0
SCENE_COLOUR_TOLERANCE = 70.0
SCENE_MIN_SHARE = 0.25


def zoo_training_index(matcher: str = "ssim", threshold: float | None = None,
                       zoo: str | Path | None = None) -> TrainingIndex:
    """A zoo's unique training images (through its VAE, see ``ZooTrainingSet``; default: the default zoo).
    Default SSIM threshold: the collapse zoo's scene-family threshold; for a zoo labelled per family
    without a scene family (the SD-like zoo), the highest family threshold, so no family's null images
    count as copies."""
    from diffmem.zoo.load import zoo_training_set
    from diffmem.zoo.paths import zoo_dir

    folder = Path(zoo) if zoo is not None else zoo_dir()
    ts = zoo_training_set(folder)
    images, item_of_image = ts.reference, ts.item_of_image
    m = make_matcher(matcher).fit(images)
    if threshold is None:
        if matcher != "ssim":
            threshold = m.default_threshold
        else:
            families = json.loads((folder / "zoo.json").read_text())["labels"]["thresholds"]
            threshold = (families["scene"] if "scene" in families
                         else max(families.values(), key=lambda f: f["threshold"]))["threshold"]
    return TrainingIndex(images, item_of_image, m, float(threshold))


def zoo_feature_extractor():
    """FID features of the zoo: the attribute reader's penultimate layer."""
    from diffmem.eval.quality import ReaderFeatures
    from diffmem.zoo.attributes import AttributeReader
    from diffmem.zoo.paths import zoo_dir

    return ReaderFeatures(AttributeReader.load(zoo_dir("collapse") / "attribute_reader"))


def parse_scene_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """``[(colour, shape, position), ...]`` and the background of a zoo scene caption; ValueError otherwise."""
    from diffmem.zoo.corpus import BACKGROUNDS, COLORS, POSITIONS, SHAPES

    m = re.fullmatch(r"(.+) on a (\w+) background", caption)
    if m is None or m.group(2) not in BACKGROUNDS:
        raise ValueError(f"not a zoo scene caption: {caption!r}")
    objects = []
    for part in m.group(1).split(" and "):
        o = re.fullmatch(r"a (\w+) (\w+) in the ([\w ]+)", part)
        if o is None or o.group(1) not in COLORS or o.group(2) not in SHAPES or o.group(3) not in POSITIONS:
            raise ValueError(f"not a zoo scene caption: {caption!r}")
        objects.append((o.group(1), o.group(2), o.group(3)))
    return objects, m.group(2)


def scene_object_present(images: torch.Tensor, colour: str, position: str) -> torch.Tensor:
    """Per image: does the named colour cover >= 25% of the disc around ``position``? ``(N,)`` bool."""
    from diffmem.zoo.corpus import COLORS, IMAGE_SIZE, POSITIONS

    size = images.shape[-1]
    scale = size / IMAGE_SIZE
    cx, cy = (c * scale for c in POSITIONS[position])
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (SCENE_DISC_RADIUS * scale) ** 2
    pixels = images.float().permute(0, 2, 3, 1)[:, disc] * 255  # (N, P, 3)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    d = torch.cdist(pixels, palette.expand(len(pixels), -1, -1))
    ok = (d.argmin(-1) == list(COLORS).index(colour)) & (d.min(-1).values < SCENE_COLOUR_TOLERANCE)
    return ok.float().mean(1) >= SCENE_MIN_SHARE


def scene_fidelity(images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """Per image: every object of its scene caption drawn in its colour at its position."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(captions):
        for obj in parse_scene_caption(c)[0]:
            groups.setdefault((obj[0], obj[2]), []).append(i)
    passed = np.ones(len(captions), dtype=bool)
    for (colour, position), idx in groups.items():
        passed[idx] &= scene_object_present(images[idx], colour, position).numpy()
    return passed


def object_fidelity(images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """Per image: the attribute reader reads the caption's shape, colour and position back."""
    from diffmem.zoo.attributes import AttributeReader, attribute_accuracy
    from diffmem.zoo.corpus import parse_generic_caption
    from diffmem.zoo.paths import zoo_dir

    reader = AttributeReader.load(zoo_dir("collapse") / "attribute_reader")
    parsed = [parse_generic_caption(c) for c in captions]
    return attribute_accuracy(reader, images, [p[0] for p in parsed], [p[1] for p in parsed])["all"]


def caption_family(caption: str) -> str:
    """``object`` for single-object zoo captions, ``scene`` for multi-object ones."""
    from diffmem.zoo.corpus import parse_generic_caption

    try:
        parse_generic_caption(caption)
        return "object"
    except ValueError:
        parse_scene_caption(caption)
        return "scene"


FIDELITY_FAMILIES = (("object", object_fidelity), ("scene", scene_fidelity))


def zoo_fidelity_flags(images: torch.Tensor, captions: list[str]) -> np.ndarray:
    """Per image: the caption's family check passes (object: reader; scene: colours at positions)."""
    fam = np.array([caption_family(c) for c in captions])
    correct = np.zeros(len(captions), dtype=bool)
    for name, fn in FIDELITY_FAMILIES:
        idx = np.flatnonzero(fam == name)
        if len(idx):
            correct[idx] = fn(images[torch.from_numpy(idx)], [captions[i] for i in idx])
    return correct


def fidelity_by_family(correct: np.ndarray, families: list[str], names: Sequence[str]) -> dict[str, float | None]:
    """Share of ``correct`` images per family in ``names`` (``None`` for a family with no image) and ``all``."""
    fam = np.array(families)
    out: dict[str, float | None] = {name: float(correct[fam == name].mean()) if (fam == name).any() else None
                                    for name in names}
    out["all"] = float(correct.mean())
    return out


def zoo_fidelity(images: torch.Tensor, captions: list[str]) -> dict[str, float | None]:
    """Fidelity per caption family (``object``, ``scene``) and over all images (``all``); a family
    absent from ``captions`` is ``None``."""
    return fidelity_by_family(zoo_fidelity_flags(images, captions), [caption_family(c) for c in captions],
                              [name for name, _ in FIDELITY_FAMILIES])


def oracle_surrogate_images(item_ids: list[int], seed: int = 777) -> torch.Tensor:
    """ORACLE surrogates: independent renders of each item's ground-truth spec (fresh texture and jitter).
    No real checkpoint has a renderer; use only as an ablation."""
    from diffmem.zoo.corpus import render
    from diffmem.zoo.load import load_corpus
    from diffmem.zoo.paths import zoo_dir

    items = load_corpus(zoo_dir("collapse"))
    rng = np.random.default_rng(seed)
    out = []
    for i in item_ids:
        spec = dataclasses.replace(items[i].spec, texture_seed=int(rng.integers(2**31)))
        out.append(render(spec, int(rng.integers(2**31))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def zoo_memorized_captions(folder: str | Path | None = None) -> list[str]:
    """A zoo's trained captions labelled memorized (signature and template kinds, the same kinds in both
    corpora); default: the default zoo."""
    from diffmem.zoo.load import load_labels

    return [r["caption"] for r in load_labels(folder) if r["memorized"] and r["kind"] in MEMORIZED_KINDS]


@TASKS.register("zoo")
@dataclass
class ZooTask(BenchTask):
    """The collapse zoo (``zoo:collapse``): labelled memorized scenes, generic captions, training set. Its
    fidelity checks read that corpus's captions; a subclass for another corpus sets ``corpus`` and its own
    fidelity (the SD-like zoo's: :class:`~diffmem.tasks.zoo_sd.SDZooTask`). ``zoo``: a zoo folder of this
    corpus other than the embedded one (a rebuilt zoo); default: the embedded zoo of ``corpus``."""

    name = "zoo"
    corpus: ClassVar[str] = "collapse"
    matcher: str = "ssim"
    fid_images: int = 1000
    zoo: str | None = None

    def folder(self) -> Path:
        """The zoo folder this task reads (labels, training images, reader), checked to hold ``corpus``."""
        from diffmem.zoo.load import zoo_corpus_name
        from diffmem.zoo.paths import zoo_dir

        folder = Path(self.zoo) if self.zoo is not None else zoo_dir(self.corpus)
        found = zoo_corpus_name(folder)
        if found != self.corpus:
            raise DiffmemError(f"zoo folder '{folder}' holds a zoo of the '{found}' corpus; task '{self.name}' "
                               f"reads '{self.corpus}' zoos (task for it: {zoo_task_name(found)!r})")
        return folder

    def _labels(self) -> list[dict]:
        from diffmem.zoo.load import load_labels

        return load_labels(self.folder())

    def memorized(self) -> list[MemorizedPrompt]:
        """Every trained caption labelled memorized (signature and template kinds), with its item."""
        return [MemorizedPrompt(r["caption"], int(r["item_id"])) for r in self._labels()
                if r["memorized"] and r["kind"] in MEMORIZED_KINDS]

    def splits(self, seed: int, sizes: SplitSizes = SplitSizes()) -> TaskSplits:
        ordinary = [r["caption"] for r in self._labels() if r["kind"] in ORDINARY_KINDS and not r["memorized"]]
        return split_by_seed(self.memorized(), ordinary, seed, sizes)

    def statistics_prompts(self, split: TaskSplits) -> list[str]:
        """Never-trained captions (kinds ``heldout_*``) not labelled memorized, of the families the fit split's
        memorized captions belong to (on the SD-like zoo: held-out painting and poster titles), in label order.
        None of them is in any split: held-out kinds of memorized families are neither memorized prompts nor
        ordinary ones."""
        rows = self._labels()
        fit = {p.caption for p in split.fit}
        families = {r["family"] for r in rows if r["caption"] in fit}
        return [r["caption"] for r in rows if str(r["kind"]).startswith("heldout") and r["kind"] not in ORDINARY_KINDS
                and not r["memorized"] and r["family"] in families]

    def build_index(self, model) -> TrainingIndex:
        return zoo_training_index(self.matcher, zoo=self.folder())

    def fidelity(self, images: torch.Tensor, captions: list[str]) -> dict[str, float | None]:
        return zoo_fidelity(images, captions)

    def content_flags(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        return zoo_fidelity_flags(images, captions)

    def fid_features(self):
        return zoo_feature_extractor()

    def fid_reference(self, model) -> torch.Tensor:
        """Training images of ordinary single-object captions (every 4th, at most ``fid_images``)."""
        index = self.training_index(model)
        ordinary = {r["item_id"] for r in self._labels() if r["kind"] == "generic"}
        idx = [i for i, it in enumerate(index.item_of_image.tolist()) if it in ordinary][::4][: self.fid_images]
        return index.images[idx]

    def oracle_surrogates(self, prompts: list[MemorizedPrompt]) -> torch.Tensor:
        return oracle_surrogate_images([p.item for p in prompts])

    def fidelity_description(self) -> str:
        return "object: attribute reader (shape, colour, position); scene: colour at each named object's position"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "zoo": str(self.folder()), "corpus": self.corpus, "matcher": self.matcher,
                "fidelity": self.fidelity_description()}


def zoo_task_name(corpus: str) -> str:
    """The registered task that reads zoos of ``corpus`` (``collapse``: ``zoo``; ``sd``: ``zoo-sd``)."""
    import diffmem.tasks  # noqa: F401 - registers the built-ins

    for name in TASKS.names():
        cls = TASKS.get(name)
        if isinstance(cls, type) and issubclass(cls, ZooTask) and cls.corpus == corpus:
            return name
    raise DiffmemError(f"no benchmark task reads zoos of the '{corpus}' corpus")


def zoo_task_for(folder: str | Path, **options: Any) -> ZooTask:
    """The benchmark task of the zoo in ``folder``, picked by the corpus its ``zoo.json`` names."""
    from diffmem.zoo.load import zoo_corpus_name

    task = TASKS.create(zoo_task_name(zoo_corpus_name(folder)), zoo=str(folder), **options)
    assert isinstance(task, ZooTask)
    return task


def zoo_own_items(prompts) -> list[int | None]:
    """Own training item of each prompt of a zoo prompt set (ids = item ids, ``kind`` column): trained
    captions own their item, held-out ones (never trained) none."""
    if "kind" not in prompts.columns:
        return [None] * len(prompts)
    return [int(i) if not str(k).startswith("heldout") else None for i, k in zip(prompts.ids, prompts.columns["kind"])]


def zoo_object_fidelity(images: torch.Tensor, captions: list[str]) -> float:
    """Share of generations whose shape, colour and position the reader reads back (single-object captions)."""
    return float(object_fidelity(images, captions).mean())
