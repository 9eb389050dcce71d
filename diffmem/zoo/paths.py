"""Where the embedded zoos live.

- ``collapse`` (the shipped zoo, model name ``zoo`` / ``zoo:collapse``): ``diffmem/zoo/checkpoint``, or
  ``$DIFFMEM_ZOO`` if set;
- ``sd`` (the SD-like zoo, ``zoo:sd``, docs/zoo-sd.md): ``diffmem/zoo/checkpoint_sd``, or ``$DIFFMEM_ZOO_SD``
  if set; it exists once ``diffmem zoo build --corpus sd`` has written it there.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffmem.errors import ModelLoadError

SHIPPED = Path(__file__).parent / "checkpoint"
SHIPPED_SD = Path(__file__).parent / "checkpoint_sd"
# corpus name -> (environment variable that overrides the folder, default folder)
LOCATIONS: dict[str, tuple[str, Path]] = {"collapse": ("DIFFMEM_ZOO", SHIPPED), "sd": ("DIFFMEM_ZOO_SD", SHIPPED_SD)}


def zoo_dir(corpus: str = "collapse") -> Path:
    """The folder of the zoo trained on ``corpus``: ``pipeline/``, ``attribute_reader/``, ``manifest.jsonl``,
    ``labels.jsonl``, ``zoo.json``; one :class:`ModelLoadError` line saying how to build it when absent."""
    if corpus not in LOCATIONS:
        raise ModelLoadError(f"unknown zoo corpus '{corpus}'; expected one of {', '.join(LOCATIONS)}")
    env, default = LOCATIONS[corpus]
    path = Path(os.environ.get(env, default))
    if (path / "pipeline" / "model_index.json").is_file():
        return path
    if corpus == "collapse":
        raise ModelLoadError(f"no zoo checkpoint at '{path}': expected pipeline/model_index.json "
                             "(run `diffmem zoo build --out DIR` and point DIFFMEM_ZOO at DIR)")
    raise ModelLoadError(f"zoo:{corpus} is not built: no pipeline/model_index.json in '{path}'; build it with "
                         f"`diffmem zoo build --corpus {corpus} --out {path}` (1.5 to 2.5 h on 2 cores, resumable) "
                         f"or point {env} at a built one")


def zoo_pipeline_path(corpus: str = "collapse") -> Path:
    """The diffusers pipeline folder of the zoo trained on ``corpus``."""
    return zoo_dir(corpus) / "pipeline"
