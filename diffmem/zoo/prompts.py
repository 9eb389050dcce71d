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
# the zoos' negatives reported apart by the detection protocol (its ``negative_groups``): None = every kind
NEGATIVE_GROUPS: dict[str, tuple[str, ...] | None] = {"all": None, "ordinary": ("generic", "heldout_generic"),
                                                      "once_seen_titles": ("title",)}


def zoo_prompts(max_negatives_per_kind: int | None = None,
                exclude: set[str] | frozenset[str] = frozenset(), folder: str | Path | None = None) -> PromptSet:
    """A zoo's captions (``folder``; default: the default zoo) with their kind, replication rate, family and
    extracted label.

    With ``max_negatives_per_kind``: every memorized caption, and per kind at most that many evenly spaced
    non-memorized ones (a stratified set for benchmarks and the demo); captions in ``exclude`` (e.g. the
    reference prompts a calibrated detector standardises on) are left out.
    """
    from diffmem.eval.protocol import labelled_prompts

    folder = Path(folder) if folder is not None else zoo_dir()
    return labelled_prompts(load_labels(folder), max_negatives_per_kind, exclude, source=f"zoo:{folder}")


def zoo_reference_prompts(n: int = 200, folder: str | Path | None = None) -> list[str]:
    """Ordinary reference prompts of a zoo (default: the default zoo): every 5th trained caption of each of
    :data:`REFERENCE_KINDS` the labels call not memorized, alternating between the kinds (first n): the collapse
    zoo's single objects, the SD-like zoo's ordinary captions and once-seen titles. The detection benchmark's
    reference set (:func:`diffmem.eval.protocol.reference_captions` with the same kinds)."""
    from diffmem.eval.protocol import reference_captions

    return reference_captions(load_labels(folder), REFERENCE_KINDS, n)


def zoo_null_prompts(folder: str | Path | None = None) -> PromptSet:
    """A zoo's never-trained captions (replication 0: held-out ordinary captions, signatures and templates),
    with their family: the null of replication verdicts (:mod:`diffmem.eval.verdicts`), what the model makes
    of captions of each family it never saw."""
    from diffmem.eval.protocol import labelled_prompts

    folder = Path(folder) if folder is not None else zoo_dir()
    rows = [r for r in load_labels(folder) if r.get("replication") == 0]
    return labelled_prompts(rows, source=f"zoo:{folder}:never-trained")
