"""The shipped SD-like zoo (``zoo:sd``, issue #11): a plain SD pipeline whose ordinary captions vary across seeds,
whose duplicated captions repeat their training image, and whose labels say so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.eval.similarity import ssim_pairs
from diffmem.models import load_model
from diffmem.zoo.load import load_corpus, load_labels, zoo_training_set
from diffmem.zoo.paths import DEFAULT_CORPUS, zoo_dir, zoo_pipeline_path
from diffmem.zoo.sd_corpus import render_scene
from diffmem.zoo.sd_gates import null_aware_gate

# the shipped build's labels (build 7, benchmarks/results/zoo_sd_gates.json): 16x and 64x 1.0, look-alikes
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
    assert share["heldout_signature"] <= GATE_LOOKALIKE and share["title"] <= 0.05, share
    summary = zoo["record"]["labels"]
    assert summary["labeller"] == "verdicts" and all(r["q_value"] <= 0.05 for r in rows if r["memorized"])
    # ordinary captions: no more called than a caption that only generalises is (the verdicts' BH cut on p)
    ordinary = [r["memorized"] for r in rows if r["kind"] == "generic"]
    assert null_aware_gate(sum(ordinary), len(ordinary), summary["count"]["cut"])["pass"], share
    assert {int(k): v["share"] for k, v in summary["signature_by_replication"].items()} == pytest.approx(
        by_rate, abs=1e-4)


def test_ordinary_captions_vary_and_duplicated_ones_repeat(zoo):
    """Regenerated now, not read from labels: 4 seeds of an ordinary caption give different pictures (mean
    pairwise SSIM well below a duplicated caption's), and the top-rate signatures come back as their image."""
    labels = zoo["labels"]
    top = [r for r in labels if r["kind"] == "signature" and r["replication"] == 64
           and r["matching"] == r["generations"]][:3]
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
    thresholds = zoo["record"]["labels"]["thresholds"]  # each family's null threshold
    assert (own_ssim.amax(1) > torch.tensor([thresholds[r["family"]]["threshold"] for r in top])).all(), own_ssim


def _renders(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([render_scene(it.scene(0)) for it in items])).permute(0, 3, 1, 2).float() / 255


def test_bench_task_is_the_zoos_own_and_reads_named_factors_back(zoo):
    """`diffmem bench` on a zoo takes the task of the zoo's corpus; the SD-like task's fidelity is the gates'
    read-back: high on a caption's own training renders, low on the same renders under a caption naming
    another colour; its splits hold memorized signatures/templates and generic captions only."""
    from diffmem.tasks.zoo import ZooTask, zoo_task_for
    from diffmem.tasks.zoo_sd import SDZooTask

    task = zoo_task_for(zoo["folder"])
    assert isinstance(task, SDZooTask) and task.describe()["corpus"] == "sd"
    assert type(zoo_task_for(zoo_dir("collapse"))) is ZooTask
    with pytest.raises(DiffmemError, match="holds a zoo of the 'sd' corpus; task 'zoo' reads 'collapse'"):
        ZooTask(zoo=str(zoo["folder"])).folder()

    generic = [it for it in zoo["items"] if it.kind == "generic" and it.named.color is not None][:32]
    images, captions = _renders(generic), [it.caption for it in generic]
    other_colour = [next(o.caption for o in generic if o.named.color != it.named.color) for it in generic]
    right, wrong = task.fidelity(images, captions), task.fidelity(images, other_colour)
    assert right["ordinary"] >= 0.85 and right["title"] is None, right
    assert wrong["ordinary"] <= 0.15, wrong
    titles = [it for it in zoo["items"] if it.kind == "signature"][:16]
    flags = task.content_flags(_renders(titles), [it.caption for it in titles])
    assert flags.mean() >= 0.85  # a title names its style; its training image is drawn in it
    with pytest.raises(DiffmemError, match="is not in the zoo"):
        task.fidelity(images[:1], ["a caption the zoo never had"])

    memorized = {r["caption"] for r in zoo["labels"] if r["memorized"] and r["kind"] in ("signature", "template")}
    ordinary = {r["caption"] for r in zoo["labels"] if r["kind"] in ("generic", "heldout_generic")}
    split = task.splits(0)
    assert {p.caption for p in split.fit + split.dev + split.test} <= memorized
    assert set(split.ordinary_fit + split.ordinary_dev + split.ordinary_test) <= ordinary
    assert len(split.fit) + len(split.dev) + len(split.test) == len(memorized)  # 65 on build 7: every one used
    assert len(split.ordinary_test) == 64
