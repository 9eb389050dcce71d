"""Where the embedded zoos live, and which one is the default.

- ``collapse`` (model name ``zoo:collapse``, docs/zoo.md): ``diffmem/zoo/checkpoint``, or ``$DIFFMEM_ZOO`` if set;
- ``sd`` (the SD-like zoo, ``zoo:sd``, docs/zoo-sd.md): ``diffmem/zoo/checkpoint_sd``, or ``$DIFFMEM_ZOO_SD``
  if set.

:data:`DEFAULT_CORPUS` names the zoo that ``zoo``, ``load_model()``, the demo and every zoo helper called
without a folder use; code that is about one corpus (the collapse zoo's bench task and its benchmarks) names
that corpus explicitly, so changing the default changes nothing there.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffmem.errors import ModelLoadError

SHIPPED = Path(__file__).parent / "checkpoint"
SHIPPED_SD = Path(__file__).parent / "checkpoint_sd"
# corpus name -> (environment variable that overrides the folder, default folder)
LOCATIONS: dict[str, tuple[str, Path]] = {"collapse": ("DIFFMEM_ZOO", SHIPPED), "sd": ("DIFFMEM_ZOO_SD", SHIPPED_SD)}
DEFAULT_CORPUS = "sd"  # the zoo of the model name ``zoo``, of load_model() and of the demo


def zoo_dir(corpus: str | None = None) -> Path:
    """The folder of the zoo trained on ``corpus`` (default: :data:`DEFAULT_CORPUS`): ``pipeline/``,
    ``attribute_reader/``, ``manifest.jsonl``, ``labels.jsonl``, ``zoo.json``; one :class:`ModelLoadError` line
    saying how to build it when absent."""
    corpus = corpus or DEFAULT_CORPUS
    if corpus not in LOCATIONS:
        raise ModelLoadError(f"unknown zoo corpus '{corpus}'; expected one of {', '.join(LOCATIONS)}")
    env, default = LOCATIONS[corpus]
    path = Path(os.environ.get(env, default))
    if (path / "pipeline" / "model_index.json").is_file():
        return path
    if corpus == "collapse":
        raise ModelLoadError(f"no zoo checkpoint at '{path}': expected pipeline/model_index.json "
                             "(run `diffmem zoo build --out DIR` and point DIFFMEM_ZOO at DIR)")
    from diffmem.outputs import PACKAGE_DIR

    # no command writes into the installed package: a zoo meant for it is built elsewhere, then copied in or pointed at
    inside = path.resolve() == PACKAGE_DIR or PACKAGE_DIR in path.resolve().parents
    target = Path("runs") / f"zoo-{corpus}" if inside else path
    then = f" and point {env} at it (or copy it to '{path}')" if inside else ""
    raise ModelLoadError(f"zoo:{corpus} is not built: no pipeline/model_index.json in '{path}'; build it with "
                         f"`diffmem zoo build --corpus {corpus} --out {target}`{then} (1.5 to 2.5 h on 2 cores, "
                         f"resumable) or point {env} at a built one")


def zoo_pipeline_path(corpus: str | None = None) -> Path:
    """The diffusers pipeline folder of the zoo trained on ``corpus`` (default: :data:`DEFAULT_CORPUS`)."""
    return zoo_dir(corpus) / "pipeline"
