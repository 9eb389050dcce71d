"""Benchmark: how many near duplicates does the zoo's training index hold at each pixel-RMS cut?

nn-margin and nn-ratio split their training index into duplicate groups (exact copies, and near
duplicates within pixel RMS distance ``near_duplicate_rms``, default 0.01) and measure the margin to
the nearest *other* group. This run counts the groups of the zoo's index (its unique training images)
at several cuts, and the distribution of each image's RMS distance to its nearest other image, to show
what the default merges on the zoo (where every image is a distinct render).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/index_duplicates.py --out benchmarks/results/index_duplicates.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffmem.eval.matching import duplicate_groups
from diffmem.eval.similarity import l2_nearest
from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json
from diffmem.tasks.zoo import zoo_training_index

CUTS = (0.0, 0.005, 0.01, 0.02)
QUANTILES = (0.0, 0.001, 0.01, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/index_duplicates.json")
    args = parser.parse_args()
    started = time.time()
    index = zoo_training_index("ssim")
    images = index.images.float()
    result = {"benchmark": "index_duplicates", "index": "zoo training images (tasks.zoo.zoo_training_index)",
              "images": len(images), "groups_by_rms_cut": {}}
    for cut in CUTS:
        result["groups_by_rms_cut"][str(cut)] = duplicate_groups(images, cut).summary()
    d, _ = l2_nearest(images, images, k=2)
    result["nearest_other_image_rms_quantiles"] = {str(q): round(float(d[:, 1].quantile(q)), 5) for q in QUANTILES}
    result["seconds"] = round(time.time() - started, 1)
    atomic_write_text(Path(args.out), portable_json(result))
    print(portable_json(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
