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


def read_rgb(path: Path, what: str = "image file") -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3)`` uint8 RGB; an unreadable file is refused by name (``what`` says
    what it was meant to be)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return np.array(Image.open(path).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DiffmemError(f"{what} '{path}' cannot be read: {exc}") from exc


def load_image_folder(folder: Path, size: int) -> torch.Tensor:
    """Every image under ``folder`` as ``(N, 3, size, size)`` in [0, 1] (sorted file order), resized by
    :func:`diffmem.eval.similarity.resize_images`, the path generations take to the index's size."""
    from diffmem.eval.similarity import resize_images

    folder = Path(folder)
    if not folder.is_dir():
        raise DiffmemError(f"image folder '{folder}' does not exist")
    files = image_files(folder)
    if len(files) < 2:
        raise DiffmemError(f"image folder '{folder}' holds {len(files)} image(s); expected at least 2 "
                           f"({', '.join(IMAGE_SUFFIXES)})")
    arrays = [resize_images(torch.from_numpy(read_rgb(f)).permute(2, 0, 1)[None].float() / 255.0, size)[0]
              for f in files]
    return torch.stack(arrays)


def image_grid(rows: list[torch.Tensor], scale: int = 3, pad: int = 2):
    """Rows of ``(N, 3, H, W)`` images in [0, 1] as one PIL image (white gutters, nearest-neighbour upscaled)."""
    from PIL import Image

    h, w = rows[0].shape[-2:]
    ncols = max(len(r) for r in rows)
    canvas = np.full(((h + pad) * len(rows) + pad, (w + pad) * ncols + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


def titled(img, title: str):
    """``img`` under a one-line black title on white."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(img, (0, 18))
    ImageDraw.Draw(out).text((4, 3), title, fill="black")
    return out


def stack(panels: list):
    """PIL panels one under the other on white, as wide as the widest."""
    from PIL import Image

    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet
