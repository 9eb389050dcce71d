"""Read a zoo folder back: corpus (rebuilt from its seed and checked against the manifest) and labels."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.errors import ModelLoadError
from diffmem.zoo.corpus import CorpusConfig, ZooItem, build_corpus
from diffmem.zoo.manifest import read_jsonl


def load_corpus(folder: str | Path) -> list[ZooItem]:
    """The zoo's items with their renderer specs, rebuilt from ``zoo.json`` and verified against the manifest."""
    folder = Path(folder)
    record = json.loads((folder / "zoo.json").read_text())
    corpus_cfg = dict(record["config"]["corpus"])
    corpus_cfg["replication_rates"] = tuple(corpus_cfg["replication_rates"])
    items = build_corpus(CorpusConfig(**corpus_cfg))
    manifest = read_jsonl(folder / "manifest.jsonl")
    if [m["caption"] for m in manifest] != [it.caption for it in items] or \
            [m["image_seeds"] for m in manifest] != [it.image_seeds for it in items]:
        raise ModelLoadError(f"the corpus rebuilt from {folder / 'zoo.json'} does not match {folder / 'manifest.jsonl'}"
                             " (different numpy version or edited manifest?)")
    return items


def load_labels(folder: str | Path) -> list[dict]:
    """Rows of ``labels.jsonl`` (one per caption, see :mod:`diffmem.zoo.labels`)."""
    path = Path(folder) / "labels.jsonl"
    if not path.is_file():
        raise ModelLoadError(f"zoo folder '{folder}' has no labels.jsonl; run `diffmem zoo label --zoo {folder}`")
    return read_jsonl(path)
