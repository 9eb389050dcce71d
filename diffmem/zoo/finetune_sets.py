"""Fine-tuning sets built from the zoo's corpora, for benchmarks of memorization-aware fine-tuning.

:func:`build_sd_domain_set` fills a :class:`diffmem.eval.finetune_domain.DomainFinetuneSet` from the SD-like
corpus (:mod:`diffmem.zoo.sd_corpus`), whose "painting"/"poster" scenes and under-specified captions ("a poster
of a blue cross") the shipped (collapse) zoo never trained on: a new domain to learn, plus duplicated titles
that tempt memorization.
"""

from __future__ import annotations

import numpy as np

from diffmem.eval.finetune_domain import SPLITS, DomainFinetuneSet
from diffmem.zoo.corpus import COLORS, SHAPES
from diffmem.zoo.sd_corpus import STYLES, Named, describe, render_scene, sample_scene, title


def build_sd_domain_set(seed: int = 0, n_train: int = 8, n_heldout: int = 4, titles_per_family: int = 8,
                        copies: int | tuple[int, ...] = 32, styles: tuple[str, ...] | None = None,
                        null_titles_per_family: int = 0) -> DomainFinetuneSet:
    """A new-domain fine-tuning set from the SD-like zoo corpus, a pure function of its arguments.

    Learnt captions: every ``style x colour x shape`` caption of the SD-like grammar ("a painting of a
    red circle"); each names three factors and leaves background, texture or band, position, size and
    the small objects to chance, so its ``n_train`` + ``n_heldout`` images are independent draws (the
    domain has to be learnt, not copied). Half of the captions of each style are ``dev``, half ``test``.
    Titles: ``titles_per_family`` fresh titles per style family and copy level ("quiet harbor by mira
    kessel", "silent river poster, lisbon 1987") from the corpus's title generator, each with one image of
    its family, alternately ``dev`` and ``test``; each trained ``copies`` times (an int: one level; a tuple:
    that many titles per family at each level, e.g. ``(1, 4, 16, 64)``). ``null_titles_per_family`` more
    titles per family are drawn the same way and never trained (alternately ``dev`` and ``test``).
    """
    levels = (copies,) if isinstance(copies, int) else tuple(copies)
    if n_train < 1 or n_heldout < 1 or titles_per_family < 2 or not levels or min(levels) < 1:
        raise ValueError("build_sd_domain_set needs n_train >= 1, n_heldout >= 1, titles_per_family >= 2 "
                         "(one dev and one test title per family) and copies >= 1")
    styles = tuple(styles or STYLES)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 12]))

    def seeds(n: int) -> list[int]:
        return [int(s) for s in rng.integers(2**31, size=n)]

    named = [Named(style=st, color=c, shape=sh) for st in styles for c in COLORS for sh in SHAPES]
    split = [""] * len(named)
    for st in styles:
        rows = [i for i, n in enumerate(named) if n.style == st]
        order = rng.permutation(len(rows))
        for rank, r in enumerate(order):
            split[rows[int(r)]] = SPLITS[0] if rank < len(rows) // 2 else SPLITS[1]
    train, heldout = [], []
    for n in named:
        s = seeds(n_train + n_heldout)
        imgs = [render_scene(sample_scene(n, x)) for x in s]
        train.append(np.stack(imgs[:n_train]))
        heldout.append(np.stack(imgs[n_train:]))
    titles, title_split, title_images, title_copies, used = [], [], [], [], set()

    def fresh_title(family: str) -> str:
        while True:
            caption, _ = title(family, rng)
            if caption not in used:
                used.add(caption)
                return caption

    for level in levels:
        for family in styles:
            for k in range(titles_per_family):
                titles.append(fresh_title(family))
                title_split.append(SPLITS[k % 2])
                title_images.append(render_scene(sample_scene(Named(style=family), seeds(1)[0])))
                title_copies.append(level)
    null_titles, null_split = [], []
    for family in styles:
        for k in range(null_titles_per_family):
            null_titles.append(fresh_title(family))
            null_split.append(SPLITS[k % 2])
    return DomainFinetuneSet([describe(n) for n in named], split, np.stack(train), np.stack(heldout), titles,
                             title_split, np.stack(title_images), title_copies,
                             {"source": "diffmem.zoo.sd_corpus", "seed": seed, "n_train": n_train,
                              "n_heldout": n_heldout, "titles_per_family": titles_per_family, "copies": list(levels),
                              "null_titles_per_family": null_titles_per_family, "styles": list(styles)},
                             null_titles, null_split, named)
