"""Image files and image tensors: reading a user's image folder (training images, references).

Images are ``(N, 3, H, W)`` float tensors in [0, 1] everywhere in diffmem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffmem.errors import DiffmemError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in sorted path order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(folder: Path, size: int) -> torch.Tensor:
    """Every image under ``folder`` as ``(N, 3, size, size)`` in [0, 1] (sorted file order)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DiffmemError(f"image folder '{folder}' does not exist")
    files = image_files(folder)
    if len(files) < 2:
        raise DiffmemError(f"image folder '{folder}' holds {len(files)} image(s); expected at least 2 "
                           f"({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        try:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
        except (UnidentifiedImageError, OSError) as exc:
            raise DiffmemError(f"image file '{f}' cannot be read: {exc}") from exc
        arrays.append(np.asarray(img))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
