"""The zoo's manifest (one row per caption) and build record, written beside the pipeline."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from diffmem.io import atomic_write_text
from diffmem.zoo.corpus import ZooItem


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def write_manifest(folder: Path, items: list[ZooItem], cfg, seconds: dict[str, float]) -> None:
    """``manifest.jsonl`` (every caption, kind, replication rate, training-image seeds) and ``zoo.json``."""
    from diffmem.models.loader import load_model

    write_jsonl(folder / "manifest.jsonl", [it.record() for it in items])
    model = load_model(folder / "pipeline")
    params = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("unet", "text_encoder", "vae")}
    record = {"config": cfg.to_dict(), "train_seconds": round(sum(seconds.values()), 1),
              "train_seconds_by_stage": seconds, "parameters": params,
              "versions": _versions()}
    atomic_write_text(folder / "zoo.json", json.dumps(record, indent=2))
