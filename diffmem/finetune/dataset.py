"""A user's fine-tuning set: an image-caption folder, read once and checked before any training starts.

Two layouts are accepted, the two that Stable Diffusion fine-tuning scripts read:

- ``metadata.jsonl`` at the folder's top (the Hugging Face ``imagefolder`` convention that diffusers'
  ``train_text_to_image.py`` reads): one JSON object per line with ``file_name`` (relative to the folder)
  and ``text``, a caption or a list of captions;
- a caption file beside each image: ``cat.png`` + ``cat.txt``, one caption per non-empty line.

Several captions of one image are kept as a list: training draws one per step when the multi-caption
mitigation is on (Somepalli et al. 2023), else the first. Images are centre-cropped to a square and resized
to the model's resolution (what ``train_text_to_image.py`` does with ``--center_crop``), through
:func:`diffmem.eval.similarity.resize_images`, the one resize path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffmem.errors import DiffmemError
from diffmem.images import IMAGE_SUFFIXES, image_files, read_rgb

METADATA_FILE = "metadata.jsonl"


@dataclass
class FinetuneSet:
    """Images ``(N, 3, S, S)`` in [0, 1] with their captions (one list per image) and file names."""

    images: torch.Tensor
    captions: list[list[str]]
    files: list[str]  # relative to the folder, for reports
    source: str = "<memory>"
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files left out (deduplication)

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.captions) == len(self.files)):
            raise ValueError(f"{len(self.images)} images, {len(self.captions)} caption lists, {len(self.files)} files")
        empty = [f for f, c in zip(self.files, self.captions) if not c]
        if empty:
            raise DiffmemError(f"fine-tuning image '{empty[0]}' in '{self.source}' has no caption; expected at "
                               "least one non-empty caption per image")

    def __len__(self) -> int:
        return len(self.files)

    def first_captions(self) -> list[str]:
        return [c[0] for c in self.captions]

    def take(self, rows: list[int]) -> FinetuneSet:
        return FinetuneSet(self.images[rows], [self.captions[i] for i in rows], [self.files[i] for i in rows],
                           self.source, dict(self.dropped))

    def digest(self) -> str:
        """A fingerprint of images and captions: what a resumed run checks it is training on."""
        h = hashlib.sha256()
        h.update((self.images * 255).round().to(torch.uint8).numpy().tobytes())
        h.update(json.dumps(self.captions).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"source": self.source, "images": len(self), "captions": sum(len(c) for c in self.captions),
                "resolution": int(self.images.shape[-1]), "digest": self.digest(),
                "dropped": {k: len(v) for k, v in self.dropped.items()}}


def _metadata_captions(folder: Path) -> dict[str, list[str]]:
    """file name -> captions, from ``metadata.jsonl``; each bad line is named."""
    table: dict[str, list[str]] = {}
    path = folder / METADATA_FILE
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DiffmemError(f"'{path}' line {number} is not a JSON object with 'file_name' and 'text' "
                               f"({type(exc).__name__}: {exc})") from exc
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DiffmemError(f"'{path}' line {number}: 'text' must be a caption or a list of captions")
        table[str(name)] = [t.strip() for t in texts if t.strip()]
    return table


def _sidecar_captions(image: Path) -> list[str] | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    return [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]


def _square(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 to ``(3, s, s)`` float in [0, 1], centre-cropped to its shorter side."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top:top + s, left:left + s]
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0


@dataclass
class RawFinetuneFolder:
    """A checked image-caption folder with its images decoded at their own sizes (before a model is loaded)."""

    folder: Path
    arrays: list[np.ndarray]
    captions: list[list[str]]
    files: list[str]

    def at(self, resolution: int) -> FinetuneSet:
        """The set centre-cropped and resized to ``resolution`` pixels."""
        from diffmem.eval.similarity import resize_images

        tensors = [resize_images(_square(a)[None], resolution)[0] for a in self.arrays]
        return FinetuneSet(torch.stack(tensors), self.captions, self.files, str(self.folder))


def check_finetune_folder(folder: str | Path) -> RawFinetuneFolder:
    """The image-caption folder at ``folder`` (see the module docstring), checked and decoded.

    Refused with one line naming the input: a missing folder, no images, an image without a caption, a
    ``metadata.jsonl`` row naming a missing file, an unreadable image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffmemError(f"fine-tuning folder '{folder}' does not exist; expected a folder of images with "
                           f"captions ({METADATA_FILE}, or a .txt file beside each image)")
    if (folder / METADATA_FILE).is_file():
        table = _metadata_captions(folder)
        missing = [n for n in table if not (folder / n).is_file()]
        if missing:
            raise DiffmemError(f"'{folder / METADATA_FILE}' names '{missing[0]}', which is not a file in '{folder}'")
        files = sorted(folder / n for n in table)
        captions = [table[str(f.relative_to(folder))] for f in files]
    else:
        files = image_files(folder)
        captions = []
        for f in files:
            found = _sidecar_captions(f)
            if found is None:
                raise DiffmemError(f"fine-tuning image '{f}' has no caption: expected '{f.with_suffix('.txt').name}' "
                                   f"beside it, or a {METADATA_FILE} in '{folder}'")
            captions.append(found)
    if not files:
        raise DiffmemError(f"fine-tuning folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    empty = [f for f, c in zip(files, captions) if not c]
    if empty:
        raise DiffmemError(f"fine-tuning image '{empty[0]}' has no caption; expected at least one non-empty caption")
    arrays = [read_rgb(f, "fine-tuning image") for f in files]
    return RawFinetuneFolder(folder, arrays, captions, [str(f.relative_to(folder)) for f in files])


def read_finetune_folder(folder: str | Path, resolution: int) -> FinetuneSet:
    """:func:`check_finetune_folder` at ``resolution`` pixels."""
    return check_finetune_folder(folder).at(resolution)


def write_finetune_folder(folder: str | Path, images: torch.Tensor, captions: list[list[str]] | list[str],
                          names: list[str] | None = None) -> Path:
    """Write images (PNG) and a ``metadata.jsonl``: the layout :func:`read_finetune_folder` reads (tasks and
    tests build their fine-tuning sets with it). ``folder`` must not exist yet."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    names = names or [f"{i:05d}.png" for i in range(len(images))]
    rows = []
    for name, image, caption in zip(names, images, captions):
        array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / METADATA_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def replay_set(model, prompts: list[str], n: int, seed: int = 50_000, steps: int = 25) -> FinetuneSet:
    """``n`` of the model's own generations of ``prompts`` (cycled; seeds ``seed``, ``seed + 1``, ...): a replay
    set that keeps what the model drew before fine-tuning (retention), with no access to its original training
    data. Generated at the model's resolution, so it joins a fine-tuning set as it is."""
    if n < 1 or not prompts:
        raise DiffmemError(f"a replay set needs prompts and n >= 1 (got {len(prompts)} prompts, n = {n})")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    images = model.sample(chosen, list(range(seed, seed + n)), num_inference_steps=steps).images
    return FinetuneSet(images, [[p] for p in chosen], [f"replay{i:05d}.png" for i in range(n)], "replay")


def concat_sets(a: FinetuneSet, b: FinetuneSet) -> FinetuneSet:
    """``a`` followed by ``b`` (one fine-tuning set; ``a``'s source and dropped files kept)."""
    if a.images.shape[1:] != b.images.shape[1:]:
        raise DiffmemError(f"cannot join image sets of shapes {tuple(a.images.shape[1:])} and "
                           f"{tuple(b.images.shape[1:])}")
    return FinetuneSet(torch.cat([a.images, b.images]), a.captions + b.captions, a.files + b.files, a.source,
                       dict(a.dropped))
