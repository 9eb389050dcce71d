"""``diffmem deepssim train``: train a DeepSSIM embedder on the zoo corpus or an image folder."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from diffmem.images import IMAGE_SUFFIXES, load_image_folder  # noqa: F401 - re-exported for old imports


def zoo_images_and_groups(folder: str | Path | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A zoo's unique training images and their caption ids (renders of one caption form a group); ``folder``
    (default: the shipped zoo) may hold either corpus, rendered by the one its ``zoo.json`` names."""
    from diffmem.zoo.load import zoo_training_images

    data = zoo_training_images(folder)
    return (data.pixels + 1) / 2, data.item_of_image()


def run_train(args: argparse.Namespace) -> None:
    from diffmem.eval.deepssim import DeepSSIMConfig, train_and_save
    from diffmem.outputs import check_output_dir, discard, publish, staging_dir

    writes = ["model.safetensors", "config.json", "agreement.json"]
    check_output_dir(args.out, "deepssim-train", [args.images], args.force, writes=writes)
    cfg = dataclasses.replace(DeepSSIMConfig(), steps=args.steps, seed=args.seed)
    if args.images:
        images, groups = load_image_folder(Path(args.images), cfg.image_size), None
    else:
        images, groups = zoo_images_and_groups()
    staging = staging_dir(args.out)
    try:
        stats = train_and_save(images, groups, staging, cfg)
        publish(staging, args.out, "deepssim-train")
    except BaseException:
        discard(staging)
        raise
    print(f"DeepSSIM saved to {args.out}; held-out agreement with SSIM: pearson {stats['pearson']:.3f}, "
          f"spearman {stats['spearman']:.3f}, MAE {stats['mae']:.3f} over {stats['pairs']} pairs")
