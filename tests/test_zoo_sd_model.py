"""The shipped SD-like zoo (``zoo:sd``, issue #11): a plain SD pipeline whose ordinary captions vary across seeds,
whose duplicated captions repeat their training image, and whose labels say so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.eval.similarity import ssim_pairs
from diffmem.models import load_model
from diffmem.zoo.load import load_corpus, load_labels, zoo_training_set
from diffmem.zoo.paths import DEFAULT_CORPUS, zoo_dir, zoo_pipeline_path

# the shipped build's labels (build 4, benchmarks/results/zoo_sd_gates.json): 16x and 64x 1.0, look-alikes
# 0.03; the bounds are the targets
GATE_16 = GATE_64 = 0.9
GATE_LOOKALIKE = 0.05


@pytest.fixture(scope="module")
def zoo():
    folder = zoo_dir("sd")
    return {"folder": folder, "model": load_model("zoo:sd"), "items": load_corpus(folder),
            "labels": load_labels(folder), "record": json.loads((folder / "zoo.json").read_text())}


def test_sd_zoo_is_the_default_and_a_plain_pipeline(zoo):
    assert DEFAULT_CORPUS == "sd" and zoo_dir() == zoo_dir("sd")
    assert zoo["record"]["corpus"] == "sd"
    index = json.loads((zoo_pipeline_path("sd") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert all(f.suffix != ".bin" for f in zoo_pipeline_path("sd").rglob("*"))  # safetensors only
    assert load_model().fingerprint == zoo["model"].fingerprint  # load_model() returns the default zoo


def test_memorization_comes_from_duplication(zoo):
    """Recomputed from the per-caption labels: the memorized share rises with the duplication rate, the top
    rates are memorized, once-seen items and never-trained look-alikes are not; zoo.json's summary agrees."""
    rows = zoo["labels"]
    sig = [r for r in rows if r["kind"] == "signature"]
    by_rate = {rate: float(np.mean([r["memorized"] for r in sig if r["replication"] == rate]))
               for rate in sorted({r["replication"] for r in sig})}
    assert by_rate[64] >= GATE_64 and by_rate[16] >= GATE_16 and by_rate[1] <= 0.1, by_rate
    share = {k: float(np.mean([r["memorized"] for r in rows if r["kind"] == k]))
             for k in ("generic", "heldout_signature", "title")}
    assert share["generic"] <= 0.01 and share["heldout_signature"] <= GATE_LOOKALIKE and share["title"] <= 0.05, share
    summary = zoo["record"]["labels"]
    assert {int(k): v["memorized"] for k, v in summary["signature_by_replication"].items()} == pytest.approx(
        by_rate, abs=1e-4)


def test_ordinary_captions_vary_and_duplicated_ones_repeat(zoo):
    """Regenerated now, not read from labels: 4 seeds of an ordinary caption give different pictures (mean
    pairwise SSIM well below a duplicated caption's), and the top-rate signatures come back as their image."""
    labels = zoo["labels"]
    top = [r for r in labels if r["kind"] == "signature" and r["replication"] == 64 and r["memorized_seeds"] == 4][:3]
    ordinary = [r for r in labels if r["kind"] == "generic"][::40][:3]
    seeds = 4

    def pairwise(rows):
        gen = zoo["model"].sample([r["caption"] for r in rows for _ in range(seeds)],
                                  seeds=[500 + i for i in range(len(rows) * seeds)], num_inference_steps=25).images
        gen = gen.view(len(rows), seeds, *gen.shape[1:])
        i, j = torch.triu_indices(seeds, seeds, 1)
        return gen, torch.stack([ssim_pairs(g[i], g[j]).mean() for g in gen])

    gen_top, ssim_top = pairwise(top)
    _, ssim_ordinary = pairwise(ordinary)
    assert ssim_ordinary.max() < 0.5 < ssim_top.min(), (ssim_ordinary, ssim_top)
    ts = zoo_training_set(zoo["folder"])
    own = ts.reference[[ts.images_of_item[r["item_id"]][0] for r in top]]
    own_ssim = ssim_pairs(gen_top.flatten(0, 1), own.repeat_interleave(seeds, 0)).view(len(top), seeds)
    assert (own_ssim.amax(1) > torch.tensor([r["threshold"] for r in top])).all(), own_ssim
