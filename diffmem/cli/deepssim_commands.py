"""``diffmem deepssim train``: train a DeepSSIM embedder on the zoo corpus or an image folder."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.cli.options import add_force, handled_by, lazy_reexports, positive_int

if TYPE_CHECKING:
    import numpy as np
    import torch

_MOVED = {"IMAGE_SUFFIXES": "diffmem.images", "load_image_folder": "diffmem.images"}
__getattr__ = lazy_reexports(__name__, _MOVED)


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem deepssim train``."""
    ds = sub.add_parser("deepssim", help="train the DeepSSIM image embedder")
    dsub = ds.add_subparsers(dest="deepssim_command", required=True)
    dtrain = handled_by(dsub.add_parser("train", help="train on the zoo corpus (default) or an image folder"),
                        "diffmem.cli.deepssim_commands:run_train")
    dtrain.add_argument("--images", default=None,
                        help=f"image folder of at least {MIN_IMAGES} images (default: the zoo's training images)")
    dtrain.add_argument("--out", required=True, help="folder for model.safetensors, config.json, agreement.json")
    add_force(dtrain)
    dtrain.add_argument("--steps", type=positive_int, default=1500, help="training steps (default: 1500)")
    dtrain.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")


# fewer images leave too few held-out images (10%: 5 of 50, 10 distinct pairs) for a correlation with SSIM; on 4
# images training printed "pearson nan" and a scipy warning
MIN_IMAGES = 50


def zoo_images_and_groups(folder: str | Path | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """A zoo's unique training images and their caption ids (renders of one caption form a group); ``folder``
    (default: the shipped zoo) may hold either corpus, rendered by the one its ``zoo.json`` names."""
    from diffmem.zoo.load import zoo_training_images

    data = zoo_training_images(folder)
    return (data.pixels + 1) / 2, data.item_of_image()


def run_train(args: argparse.Namespace) -> None:
    from diffmem.errors import DiffmemError
    from diffmem.eval.deepssim import DeepSSIMConfig, train_and_save
    from diffmem.outputs import check_output_dir, staged

    writes = ["model.safetensors", "config.json", "agreement.json"]
    check_output_dir(args.out, "deepssim-train", [args.images], args.force, writes=writes)
    cfg = dataclasses.replace(DeepSSIMConfig(), steps=args.steps, seed=args.seed)
    if args.images:
        from diffmem.images import load_image_folder

        images, groups = load_image_folder(Path(args.images), cfg.image_size), None
        if len(images) < MIN_IMAGES:
            raise DiffmemError(f"--images '{args.images}' holds {len(images)} image(s); DeepSSIM needs at least "
                               f"{MIN_IMAGES} (10% are held out to measure its agreement with SSIM)")
    else:
        images, groups = zoo_images_and_groups()
    with staged(args.out, "deepssim-train") as staging:
        stats = train_and_save(images, groups, staging, cfg)
    print(f"DeepSSIM saved to {args.out}; held-out agreement with SSIM: pearson {stats['pearson']:.3f}, "
          f"spearman {stats['spearman']:.3f}, MAE {stats['mae']:.3f} over {stats['pairs']} pairs")
