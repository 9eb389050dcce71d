"""Prompt sets built from the zoo's labels: the benchmark set and the ordinary reference prompts.

The one definition of these builders: the CLI (scan, extract, mitigate, demo) and the benchmarks import
them from here, so library code and benchmarks never import the command line.
"""

from __future__ import annotations

from pathlib import Path

from diffmem.prompts import PromptSet
from diffmem.zoo.load import load_labels
from diffmem.zoo.paths import zoo_dir

# the caption kinds whose non-memorized captions serve as ordinary reference prompts (those a zoo's labels have)
REFERENCE_KINDS = ("generic", "generic_scene", "title")


def zoo_prompts(max_negatives_per_kind: int | None = None,
                exclude: set[str] | frozenset[str] = frozenset(), folder: str | Path | None = None) -> PromptSet:
    """A zoo's captions (``folder``; default: the default zoo) with their kind, replication rate, family and
    extracted label.

    With ``max_negatives_per_kind``: every memorized caption, and per kind at most that many evenly spaced
    non-memorized ones (a stratified set for benchmarks and the demo); captions in ``exclude`` (e.g. the
    reference prompts a calibrated detector standardises on) are left out.
    """
    folder = Path(folder) if folder is not None else zoo_dir()
    rows = [r for r in load_labels(folder) if r["caption"] not in exclude]
    if max_negatives_per_kind is not None:
        keep = [r for r in rows if r["memorized"]]
        for kind in sorted({r["kind"] for r in rows}):
            negatives = [r for r in rows if r["kind"] == kind and not r["memorized"]]
            step = max(1, -(-len(negatives) // max_negatives_per_kind))
            keep += negatives[::step][:max_negatives_per_kind]
        chosen = {r["item_id"] for r in keep}
        rows = [r for r in rows if r["item_id"] in chosen]
    return PromptSet(ids=[str(r["item_id"]) for r in rows], texts=[r["caption"] for r in rows],
                     source=f"zoo:{folder}", columns={"kind": [r["kind"] for r in rows],
                                                         "replication": [r["replication"] for r in rows],
                                                         "memorized": [r["memorized"] for r in rows],
                                                         "family": [r["family"] for r in rows]})


def zoo_reference_prompts(n: int = 200, folder: str | Path | None = None) -> list[str]:
    """Ordinary reference prompts of a zoo (default: the default zoo): every 5th trained caption of each of
    :data:`REFERENCE_KINDS` the labels call not memorized, alternating between the kinds (first n): the collapse
    zoo's single objects, the SD-like zoo's ordinary captions and once-seen titles. The detection benchmark's
    reference set (:func:`diffmem.eval.protocol.reference_captions` with the same kinds)."""
    from diffmem.eval.protocol import reference_captions

    return reference_captions(load_labels(folder), REFERENCE_KINDS, n)
