"""Load a local diffusers text-to-image folder (the zoo or Stable Diffusion 1.x/2.x) into a :class:`DiffusionModel`.

Components are loaded one by one with their own ``from_pretrained`` (the classes named in
``model_index.json``), so a folder's safety checker or feature extractor is never loaded and a forked
pipeline class is never needed. Weights are read from safetensors when present, otherwise with
``torch.load(weights_only=True)`` (diffusers' and transformers' default): no pickle is executed.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from diffmem.errors import ModelLoadError
from diffmem.models.model import DiffusionModel

log = logging.getLogger(__name__)

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
OPTIONAL = ("vae",)
ALLOWED_LIBRARIES = ("diffusers", "transformers")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(names)}")
    return names[dtype]


def _read_index(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelLoadError(f"model folder '{folder}' does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model path '{folder}' is a file; expected a diffusers pipeline folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(
            f"'{folder}' is not a diffusers pipeline folder: no model_index.json "
            "(save one with pipeline.save_pretrained(path))"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"'{index_path}' is not valid JSON: {exc}") from exc
    missing = [c for c in REQUIRED if not (isinstance(index.get(c), list) and index[c][1])]
    if missing:
        raise ModelLoadError(f"'{folder}' has no {', '.join(missing)} component(s) in model_index.json; "
                             f"a text-to-image pipeline needs {', '.join(REQUIRED)}")
    return index


def _components(index: dict[str, Any]) -> list[str]:
    """The components of a ``model_index.json`` that are loaded, in loading order."""
    return [name for name in REQUIRED + OPTIONAL if isinstance(index.get(name), list) and index[name][1]]


def _check_libraries(folder: Path, index: dict[str, Any]) -> None:
    """Refuse a ``model_index.json`` naming a library other than diffusers/transformers for any component, before
    any component (and its weights) loads: a model folder may come from anywhere, and its index must not make us
    import arbitrary modules."""
    for name in _components(index):
        library = index[name][0]
        if library not in ALLOWED_LIBRARIES:
            raise ModelLoadError(f"'{folder}': component {name} names library {library!r} in model_index.json; only "
                                 f"{' and '.join(ALLOWED_LIBRARIES)} components are loaded")


def model_fingerprint(source: str | Path | None = None, config: str | Path | None = None) -> str:
    """The fingerprint :attr:`DiffusionModel.fingerprint` will have once ``source`` (a model spec) is loaded,
    computed from its files without loading a weight (a folder's ``model_index.json`` is checked as
    :func:`load_model` checks it), so a command refuses a mismatched calibration, mitigation or resume first."""
    from diffmem.models import sources

    resolved = sources.resolve(source, config)
    if resolved.kind == "single_file":
        return sources.file_fingerprint(resolved.file)
    folder = Path(resolved.folder).expanduser()
    _check_libraries(folder, _read_index(folder))
    return sources.folder_fingerprint(folder)


def _load_component(folder: Path, name: str, library: str, class_name: str, dtype: torch.dtype):
    sub = folder / name
    if not sub.is_dir():
        raise ModelLoadError(f"component folder '{sub}' named in model_index.json is missing")
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"'{folder}': component {name} needs {library}.{class_name}, "
                             "which is not installed") from exc
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ModelLoadError(f"'{folder}': component {name} names {library}.{class_name}, which is not a model "
                             "class with from_pretrained")
    kwargs: dict[str, Any] = {}
    if name in ("unet", "vae", "text_encoder"):
        kwargs["torch_dtype"] = dtype
    if name in ("unet", "vae"):
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(str(sub), **kwargs)
    except Exception as exc:  # diffusers/transformers raise OSError, ValueError, SafetensorError...
        raise ModelLoadError(f"cannot load {name} from '{sub}': {type(exc).__name__}: {exc}".splitlines()[0]) from exc


def load_model(
    source: str | Path | Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: str | Path | None = None,
) -> DiffusionModel:
    """Load a text-to-image diffusion model for detection, attacks and mitigation.

    ``source`` is a model spec (None or ``"zoo"`` for the embedded memorization zoo, a local diffusers
    folder, a hub id ``org/name`` from the Hugging Face cache, a single ``.safetensors`` checkpoint with
    ``config`` = ``sd1``/``sd2``/a config folder; see :mod:`diffmem.models.sources`) or an already-built
    ``DiffusionPipeline``. ``dtype`` defaults to float32 on CPU and float16 elsewhere.
    """
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    if device.type == "cpu" and torch_dtype != torch.float32:
        log.warning("dtype %s on CPU is slow and loses precision; float32 is the CPU default", torch_dtype)
    file_fingerprint = single_file_origin = None
    if source is None or isinstance(source, (str, Path)):
        from diffmem.models import sources

        resolved = sources.resolve(source, config)
        if resolved.kind == "single_file":
            file_fingerprint = sources.file_fingerprint(resolved.file)
            source, single_file_origin = sources.load_single_file(resolved, torch_dtype), resolved.origin
        else:
            source = resolved.folder
    elif config is not None:
        raise ModelLoadError("config applies to single-file checkpoints, not to an in-memory pipeline")
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        index = _read_index(folder)
        _check_libraries(folder, index)  # every component's library, before the first weight loads
        components = {name: _load_component(folder, name, index[name][0], index[name][1], torch_dtype)
                      for name in _components(index)}
        origin = str(folder.resolve())
    else:
        components = {k: v for k, v in getattr(source, "components", {}).items() if v is not None}
        missing = [c for c in REQUIRED if c not in components]
        if missing:
            raise ModelLoadError(f"pipeline object {type(source).__name__} lacks component(s) {missing}")
        origin = single_file_origin if file_fingerprint else f"<in-memory {type(source).__name__}>"
        folder = None
    model = DiffusionModel(
        unet=components["unet"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        scheduler=components["scheduler"],
        vae=components.get("vae"),
        device=device,
        dtype=torch_dtype,
        source=origin,
        folder=folder,
    )
    if file_fingerprint is not None:
        model._fingerprint = file_fingerprint  # the file's identity, not a hash of every weight
    return model
