"""A persistent on-disk cache of computed tensors, for results that are slow to compute and fully determined by
their inputs (the VAE round trip of a zoo's training images: minutes on a CPU, the same every time).

Entries live under ``$DIFFMEM_CACHE`` (default ``~/.cache/diffmem``), one file per key, written atomically. An
entry is used only if it loads, records the key it was asked for, and holds a finite float tensor of the
expected shape; anything else (a truncated file, another key's file, a hand edit) is recomputed and rewritten,
never trusted. A cache that cannot be written (read-only home) costs the recomputation, not the command.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from diffmem.io import atomic_torch_save

log = logging.getLogger(__name__)

CACHE_ENV = "DIFFMEM_CACHE"


def cache_root() -> Path:
    """The cache folder: ``$DIFFMEM_CACHE`` if set, else ``~/.cache/diffmem``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffmem"


def tensor_digest(h: hashlib._Hash, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and exact bytes to ``h`` (so equal digests mean bit-identical tensors)."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _read(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached tensor at ``path`` if it is a valid entry for ``key`` of ``shape``, else None."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: recomputed, whatever the reason it does not load
        log.warning("cache entry %s does not load (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        log.warning("cache entry %s records another key; recomputing", path)
        return None
    value = entry.get("value")
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not value.is_floating_point() \
            or not bool(torch.isfinite(value).all()):
        log.warning("cache entry %s does not hold a finite tensor of shape %s; recomputing", path, shape)
        return None
    return value


def cached_tensor(kind: str, key: str, shape: tuple[int, ...], compute: Callable[[], torch.Tensor],
                  root: Path | None = None) -> torch.Tensor:
    """The tensor stored for ``key`` under ``<root>/<kind>/`` (default root: :func:`cache_root`) if a valid entry
    is there, else ``compute()``, stored for next time. ``key`` must name every input the result depends on."""
    path = (root or cache_root()) / kind / f"{key}.pt"
    hit = _read(path, key, shape)
    if hit is not None:
        return hit
    value = compute()
    try:
        atomic_torch_save({"key": key, "value": value.detach().cpu().contiguous()}, path)
    except OSError as exc:
        log.warning("cannot write cache entry %s (%s); continuing without it", path, exc)
    return value
