"""What a patched zoo model draws: memorized and generic captions before and after a weight-level mitigation.

The benchmark's numbers (extraction, fidelity) compress generations into a match / no-match and an
attribute check; this gallery shows them. It fits the method with its defaults on the benchmark's fit
split (``diffmem bench`` settings, same seed), then generates, for held-out memorized captions of the
eval split, the original model's image, the patched model's, and the training image the original
matches; and for generic captions the original's and the patched model's images. Rows are labelled
with the SSIM to the nearest training image.

    .venv/bin/python benchmarks/mitigation_gallery.py --method adversarial-finetune \
        --out benchmarks/results/gallery_adversarial_finetune.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="adversarial-finetune")
    parser.add_argument("--memorized", type=int, default=8, help="held-out memorized captions shown")
    parser.add_argument("--generic", type=int, default=8, help="generic captions shown")
    parser.add_argument("--seed", type=int, default=0, help="benchmark split and generation seed")
    parser.add_argument("--out", default="benchmarks/results/gallery_adversarial_finetune.png")
    args = parser.parse_args()

    from diffmem.bench import BenchSettings
    from diffmem.images import image_grid, stack, titled
    from diffmem.io import atomic_write_text
    from diffmem.mitigators import make_mitigator
    from diffmem.models import load_model
    from diffmem.provenance import portable_json
    from diffmem.tasks.zoo import ZooTask

    started = time.time()
    settings = BenchSettings()
    model = load_model("zoo:collapse")
    task = ZooTask()
    split = task.splits(args.seed, settings.sizes)
    index = task.training_index(model)
    method = make_mitigator(args.method)
    fit = [p.caption for p in split.fit]
    # model-derived surrogates checked against the training index (the bench's default)
    extra = {"index": index} if args.method == "adversarial-finetune" else {}
    method.fit(model, fit, split.ordinary_fit, **extra)
    patched = method.patched()
    memorized = [p.caption for p in split.test[: args.memorized]]
    generic = split.ordinary_test[: args.generic]
    seeds = [args.seed] * (len(memorized) + len(generic))
    before = model.sample(memorized + generic, seeds, num_inference_steps=settings.steps).images
    after = patched.sample(memorized + generic, seeds, num_inference_steps=settings.steps).images
    m_before, m_after = index.matcher.match(before), index.matcher.match(after)
    k = len(memorized)
    nearest = index.images[m_before.index[:k]]
    name = args.method
    panels = [titled(image_grid([before[:k], after[:k], nearest]),
                      f"{k} held-out memorized captions: original / {name} / original's nearest training image"),
              titled(image_grid([before[k:], after[k:]]), f"{len(generic)} generic captions: original / {name}")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stack(panels).save(out)
    record = {"method": args.method, "options": "defaults", "settings": settings.__dict__,
              "model": model.describe(), "seconds": round(time.time() - started, 1),
              "threshold": index.threshold,
              "rows": [{"caption": c, "kind": "memorized" if i < k else "generic",
                        "ssim_nearest_before": round(float(m_before.similarity[i]), 4),
                        "ssim_nearest_after": round(float(m_after.similarity[i]), 4)}
                       for i, c in enumerate(memorized + generic)]}
    atomic_write_text(out.with_suffix(".json"), portable_json(record))
    print(json.dumps(record["rows"], indent=1))
    print(f"gallery: {out}")


if __name__ == "__main__":
    main()
