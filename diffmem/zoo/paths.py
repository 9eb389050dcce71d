"""Where the embedded zoo lives: ``diffmem/zoo/checkpoint`` (shipped), or ``$DIFFMEM_ZOO`` if set."""

from __future__ import annotations

import os
from pathlib import Path

from diffmem.errors import ModelLoadError

SHIPPED = Path(__file__).parent / "checkpoint"


def zoo_dir() -> Path:
    """The zoo folder: ``pipeline/``, ``attribute_reader/``, ``manifest.jsonl``, ``labels.jsonl``, ``zoo.json``."""
    path = Path(os.environ.get("DIFFMEM_ZOO", SHIPPED))
    if not (path / "pipeline" / "model_index.json").is_file():
        raise ModelLoadError(f"no zoo checkpoint at '{path}': expected pipeline/model_index.json "
                             "(run `diffmem zoo build --out DIR` and point DIFFMEM_ZOO at DIR)")
    return path


def zoo_pipeline_path() -> Path:
    return zoo_dir() / "pipeline"
