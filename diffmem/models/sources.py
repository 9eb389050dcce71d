"""Where a model comes from: resolve a user's model spec to something :func:`diffmem.models.load_model` loads.

A spec is one of

- ``None``, ``"zoo"`` or another name in :data:`ZOO_MODELS` (``"zoo:sd"``, ``"zoo:collapse"``): an embedded
  zoo model; ``None`` and ``"zoo"`` are the default zoo (:data:`diffmem.zoo.paths.DEFAULT_CORPUS`). The table
  maps a name to a function returning its diffusers folder, so other zoos register themselves with one line;
  a zoo whose folder is missing fails with one line saying how to build it.
- a local diffusers pipeline folder (``model_index.json`` inside), as ``save_pretrained`` writes it;
- a hub id ``org/name``: the snapshot in the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; laid out as
  ``models--org--name/snapshots/<revision>/`` with ``refs/main`` naming the revision). With
  ``HF_HUB_OFFLINE=1`` (the CLI's default) only the cache is read; otherwise a model that is not cached is
  downloaded (the components a scan needs, not safety checkers or duplicate weight formats);
- one ``.safetensors`` file (``.ckpt`` pickles are refused) in the original Stable Diffusion layout, the
  single-file format of the SD community, loaded with diffusers' ``from_single_file``. Its component configs
  come from ``config``: a local diffusers folder, a hub id, or a family name of :data:`FAMILIES` (``sd1``,
  ``sd2``), which names the reference repository whose config files (:data:`CONFIG_FILES`, a few kB, no
  weights) must be in the cache when offline.

A local path always wins over a hub id of the same spelling. Every failure is a :class:`ModelLoadError`
that names what is missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.errors import ModelLoadError


def _zoo_pipeline(corpus: str | None) -> Callable[[], Path]:
    """The pipeline folder of the zoo trained on ``corpus`` (None: the default zoo); until that zoo is built,
    one error line saying how to build it."""

    def folder() -> Path:
        from diffmem.zoo.paths import zoo_pipeline_path

        return zoo_pipeline_path(corpus)

    return folder


# name -> function returning the model's diffusers folder; "zoo" is the default zoo (diffmem.zoo.paths.DEFAULT_CORPUS)
ZOO_MODELS: dict[str, Callable[[], Path]] = {"zoo": _zoo_pipeline(None), "zoo:collapse": _zoo_pipeline("collapse"),
                                             "zoo:sd": _zoo_pipeline("sd")}

# --config family name -> hub id of the reference pipeline whose config files describe that family
FAMILIES: dict[str, str] = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
}
# what from_single_file reads from a config source (configs and tokenizer; no weights)
CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json")
# and the tokenizer's vocabulary in either format: the slow tokenizer's pair, or the fast tokenizer's one file
TOKENIZER_FILES = (("tokenizer/vocab.json", "tokenizer/merges.txt"), ("tokenizer/tokenizer.json",))
# what a download of a hub pipeline fetches (a scan needs no safety checker, no .bin/.ckpt duplicates)
HUB_PATTERNS = ["model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/*.json", "text_encoder/*.safetensors",
                "unet/*.json", "unet/*.safetensors", "vae/*.json", "vae/*.safetensors"]
SINGLE_FILE_SUFFIXES = (".safetensors",)  # not .ckpt: a pickle, never executed here
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: a diffusers ``folder`` to load, or a single ``file`` with its ``config``."""

    kind: str  # "zoo" | "folder" | "hub" | "single_file"
    origin: str  # what the user named, for provenance
    folder: Path | None = None
    file: Path | None = None
    config: str | None = None  # single files: a local folder of component configs (or None: diffusers infers)


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time as huggingface_hub defines it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of ``repo_id``: from the cache, else downloaded unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        if offline():
            raise ModelLoadError(
                f"'{repo_id}' is neither a local folder nor a model in the Hugging Face cache '{cache}' "
                f"(expected {cache / ('models--' + repo_id.replace('/', '--'))}/snapshots/<revision>/; "
                f"HF_HUB_OFFLINE=1 forbids downloading): fetch it with "
                f"`HF_HUB_OFFLINE=0 huggingface-cli download {repo_id}` or set HF_HUB_CACHE") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=allow_patterns))
    except Exception as exc:  # network errors, gated or missing repositories
        raise ModelLoadError(f"cannot download '{repo_id}' into '{cache}': {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def family_config(name: str) -> Path:
    """The cached config folder of a family name (``sd1``, ``sd2``), checked file by file."""
    repo = FAMILIES[name]
    wanted = list(CONFIG_FILES) + list(TOKENIZER_FILES[0])
    try:
        folder: Path | None = hub_snapshot(repo, allow_patterns=wanted + list(TOKENIZER_FILES[1]))
    except ModelLoadError:
        folder = None
    missing = [f for f in CONFIG_FILES if folder is None or not (folder / f).is_file()]
    if folder is None or not any(all((folder / f).is_file() for f in option) for option in TOKENIZER_FILES):
        missing += list(TOKENIZER_FILES[0])
    if missing:
        raise ModelLoadError(
            f"--config {name} needs the config files of '{repo}' in the Hugging Face cache '{hub_cache_dir()}', "
            f"missing: {', '.join(missing)}; fetch them (a few kB) with `HF_HUB_OFFLINE=0 huggingface-cli download "
            f"{repo} {' '.join(missing)}` or pass --config FOLDER (a diffusers folder of the same family)")
    return folder


def _config_folder(config: str | Path | None) -> str | None:
    if config is None:
        return None
    if str(config) in FAMILIES:
        return str(family_config(str(config)))
    path = Path(config).expanduser()
    if path.is_dir():
        missing = [f for f in ("model_index.json", "unet/config.json") if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"config folder '{path}' lacks {', '.join(missing)}; expected a diffusers "
                                 "pipeline folder (configs are enough, weights are not read)")
        return str(path)
    if HUB_ID.match(str(config)):
        return str(hub_snapshot(str(config), allow_patterns=list(CONFIG_FILES) + [f for option in TOKENIZER_FILES
                                                                                 for f in option]))
    raise ModelLoadError(f"--config '{config}' is not {' or '.join(FAMILIES)}, a folder or a hub id")


def resolve(spec: str | Path | None = None, config: str | Path | None = None) -> ModelSource:
    """Resolve a model spec (see the module docstring); ``config`` only applies to single-file checkpoints."""
    if spec is None or str(spec) in ZOO_MODELS:
        name = "zoo" if spec is None else str(spec)
        if config is not None:
            raise ModelLoadError(f"--config applies to single-file checkpoints, not to the zoo model '{name}'")
        folder = ZOO_MODELS[name]()
        return ModelSource("zoo", name, folder=folder)
    text = str(spec)
    if text.startswith("zoo:"):
        raise ModelLoadError(f"unknown zoo model '{text}'; known: {', '.join(sorted(ZOO_MODELS))}")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"model path '{path}' is a file; expected a diffusers pipeline folder or a "
                                 "single-file .safetensors checkpoint (convert .ckpt pickles to safetensors first)")
        return ModelSource("single_file", str(path.resolve()), file=path, config=_config_folder(config))
    if config is not None:
        raise ModelLoadError(f"--config applies to single-file .safetensors checkpoints, not to '{text}'")
    if path.is_dir():
        return ModelSource("folder", str(path.resolve()), folder=path)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"checkpoint file '{path}' does not exist")
    if HUB_ID.match(text) and not text.startswith((".", "~")):
        return ModelSource("hub", text, folder=hub_snapshot(text, allow_patterns=HUB_PATTERNS))
    raise ModelLoadError(f"model folder '{path}' does not exist (nor is '{text}' a hub id org/name)")


def load_single_file(source: ModelSource, dtype: Any) -> Any:
    """A ``StableDiffusionPipeline`` from one original-layout checkpoint file (safety checker not loaded)."""
    from diffusers import StableDiffusionPipeline

    # safety_checker/feature_extractor passed as None: never loaded (diffusers' load_safety_checker flag, even
    # False, is deprecated and would fetch the checker from the hub)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "safety_checker": None, "feature_extractor": None,
                              "local_files_only": offline() or source.config is not None}
    if source.config is not None:
        kwargs["config"] = source.config
    try:
        return StableDiffusionPipeline.from_single_file(str(source.file), **kwargs)
    except Exception as exc:  # diffusers raises ValueError, OSError, KeyError, SafetensorError...
        hint = "" if source.config else "; name its family with --config sd1|sd2 or a diffusers config folder"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"cannot load single-file checkpoint '{source.file}': {type(exc).__name__}: "
                             f"{first}{hint}") from exc


def folder_fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) over a model folder's configs and weights (large files: size plus head and tail): a
    folder model's identity, computed from its files, so a command can compare it before loading any weight."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with path.open("rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    """sha256 (16 hex digits) over a file's size, first and last MiB: a single-file model's identity."""
    import hashlib

    h, size = hashlib.sha256(), path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), 2)
            h.update(fh.read())
    return h.hexdigest()[:16]
