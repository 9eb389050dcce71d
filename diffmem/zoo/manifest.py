"""The zoo's manifest (one row per caption) and build record, written beside the pipeline.

Items of either corpus (:class:`~diffmem.zoo.corpus.ZooItem`, :class:`~diffmem.zoo.sd_corpus.SDItem`) write
their own row with ``record()``; ``zoo.json`` names the corpus (``corpus``) beside the full config.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Protocol

from diffmem.io import atomic_write_text


class ManifestItem(Protocol):
    """A corpus item as the manifest needs it: one flat JSON-serialisable row."""

    def record(self) -> dict[str, Any]: ...


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


def write_manifest(folder: Path, items: list[ManifestItem], cfg, seconds: dict[str, float]) -> None:
    """``manifest.jsonl`` (every caption, kind, replication rate, training-image seeds; SD items also their
    family and named factors) and ``zoo.json`` (config, corpus name, times, parameter counts, versions)."""
    from diffmem.models.loader import load_model

    write_jsonl(folder / "manifest.jsonl", [it.record() for it in items])
    model = load_model(folder / "pipeline")
    params = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("unet", "text_encoder", "vae")}
    config = cfg.to_dict()
    record = {"corpus": config.get("corpus_name", "collapse"), "config": config,
              "train_seconds": round(sum(seconds.values()), 1), "train_seconds_by_stage": seconds,
              "parameters": params, "versions": _versions()}
    atomic_write_text(folder / "zoo.json", json.dumps(record, indent=2))
