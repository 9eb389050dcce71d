"""The tiny SD-like corpus and smoke build settings shared by the SD zoo's tests.

One definition, so the corpus, build and label tests exercise the same few dozen items and a
build made by one test module is the build the others reason about.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from diffmem.zoo.architecture import ArchitectureConfig
from diffmem.zoo.build import sd_zoo_config
from diffmem.zoo.sd_corpus import SDCorpusConfig

TINY_SD = SDCorpusConfig(n_base=4, n_extended=1, titles_per_family=40, signatures_per_rate=1,
                         heldout_signature_per_family=4, template_groups_per_family=1)
TINY_ARCH = ArchitectureConfig(text_width=32, text_layers=1, text_heads=2, unet_channels=(32, 32, 32), unet_heads=2,
                               vae_channels=(16, 16, 16))
SMOKE = dataclasses.replace(
    sd_zoo_config(corpus=TINY_SD, vae_steps=2, vae_batch=4, unet_steps=4, unet_batch=8, checkpoint_every=2,
                  warmup_steps=2, unet_lr_decay_steps=2, reader_steps=2, reader_batch=8, deepssim_steps=2),
    arch=TINY_ARCH)


def label_in_place(main, zoo, *options: str) -> None:
    """`diffmem zoo label` into a new folder beside a test's own zoo, then its two files copied into the zoo, as
    a maintainer refreshes a zoo's labels (the command itself never writes into the zoo)."""
    import shutil

    out = zoo.parent / f"{zoo.name}-labels"
    if out.exists():
        shutil.rmtree(out)
    assert main(["zoo", "label", "--zoo", str(zoo), "--out", str(out), *options]) in (0, None)
    for name in ("labels.jsonl", "zoo.json"):
        shutil.copyfile(out / name, zoo / name)


def copy_zoo(zoo: Path, dest: Path) -> Path:
    """A copy of a built zoo folder at ``dest`` (a test's own, to label or edit without touching the shared build)."""
    shutil.copytree(zoo, dest)
    return dest
