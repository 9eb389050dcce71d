"""The shipped zoo: loads through the same call as any SD folder, and memorizes what its labels say."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffmem.cli.main import main
from diffmem.eval.similarity import ssim_pairs
from diffmem.models import load_model
from diffmem.zoo.load import load_corpus, load_labels, zoo_training_set
from diffmem.zoo.paths import zoo_dir, zoo_pipeline_path


@pytest.fixture(scope="module")
def zoo():
    folder = zoo_dir("collapse")
    return {"folder": folder, "model": load_model("zoo:collapse"), "items": load_corpus(folder),
            "labels": load_labels(folder),
            "record": json.loads((folder / "zoo.json").read_text())}


def test_zoo_is_a_plain_stable_diffusion_pipeline(zoo):
    index = json.loads((zoo_pipeline_path("collapse") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(zoo_pipeline_path("collapse"), local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert all(f.suffix != ".bin" for f in zoo_pipeline_path("collapse").rglob("*"))  # safetensors only
    assert zoo["model"].latent_shape[1:] == (8, 8)


def test_labels_cover_every_caption(zoo):
    assert [r["caption"] for r in zoo["labels"]] == [it.caption for it in zoo["items"]]


def test_required_memorization_outcome(zoo):
    """Memorized fraction rises with replication, >= 80% at the top rate, <= 5% for generic captions: recomputed
    from the per-caption labels (each one a regeneration's verdict), and zoo.json's summary must say the same."""
    import numpy as np

    rows, summary = zoo["labels"], zoo["record"]["labels"]

    def share(selected, key="memorized"):
        return float(np.mean([float(r[key]) for r in selected]))

    signature = [r for r in rows if r["kind"] == "signature"]
    fractions = {str(rep): share([r for r in signature if r["replication"] == rep])
                 for rep in sorted({r["replication"] for r in signature})}
    assert list(fractions.values()) == sorted(fractions.values()) and list(fractions.values())[-1] >= 0.8
    by_kind = {k: share([r for r in rows if r["kind"] == k]) for k in ("generic", "heldout_generic")}
    assert by_kind["generic"] <= 0.05 and by_kind["heldout_generic"] <= 0.05
    fidelity = {k: share([r for r in rows if r["kind"] == k], "fidelity") for k in ("generic", "heldout_generic")}
    assert fidelity["generic"] >= 0.8 and fidelity["heldout_generic"] >= 0.8
    assert {k: v["memorized"] for k, v in summary["signature_by_replication"].items()} == pytest.approx(fractions,
                                                                                                      abs=1e-4)
    assert {k: summary["by_kind"][k]["memorized"] for k in by_kind} == pytest.approx(by_kind, abs=1e-4)
    assert summary["generic_fidelity"] == pytest.approx(fidelity, abs=1e-4)
    assert summary["n_memorized"] == sum(r["memorized"] for r in rows)
    # a label is the any-of-4 verdict of its labelling seeds
    assert all(r["memorized"] == (r["memorized_seeds"] >= 1) for r in rows)


def test_memorized_captions_replicate_and_generic_ones_do_not(zoo):
    """Regenerate a few captions now and compare with the training set (not just the stored labels)."""
    labels = zoo["labels"]
    top = [r for r in labels if r["kind"] == "signature" and r["replication"] == max(x["replication"] for x in labels)
           and r["memorized"]][:3]
    generic = [r for r in labels if r["kind"] == "generic"][:3]
    ts = zoo_training_set(zoo["folder"])
    train = ts.reference
    image_of_item = {item: imgs[0] for item, imgs in ts.images_of_item.items()}
    out = zoo["model"].sample([r["caption"] for r in top], seeds=[1000 + i for i in range(len(top))],
                              num_inference_steps=25).images
    own = train[[image_of_item[r["item_id"]] for r in top]]
    sims = ssim_pairs(out, own)
    assert (sims > torch.tensor([r["threshold"] for r in top])).float().mean() >= 2 / 3, sims

    gen = zoo["model"].sample([r["caption"] for r in generic], seeds=[0, 1, 2], num_inference_steps=25).images
    from diffmem.eval.similarity import l2_nearest

    _, nn = l2_nearest(gen, train, k=1)
    assert (ssim_pairs(gen, train[nn[:, 0]]) < generic[0]["threshold"]).all()


def test_demo_command_writes_grid_and_provenance(tmp_path, capsys):
    code = main(["demo", "--per-group", "2", "--seeds", "1", "--steps", "10", "--draws", "1", "--scan-prompts", "40",
                 "--scan-samples", "0", "--out", str(tmp_path)])  # image detectors on the zoo: below
    assert code == 0
    assert (tmp_path / "grid.png").stat().st_size > 1000
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert len(prov["model"]["fingerprint"]) == 16 and len(prov["rows"]) == 4
    out = capsys.readouterr().out
    assert "memorized" in out and "top 5 by noise-norm" in out and "noise-norm             AUROC" in out
    assert out.count("noise-norm             AUROC") == 1 and "against the zoo's labels (" in out
    page = (tmp_path / "report.html").read_text()
    assert "Scan: " in page and page.count("<div class=\"card\">") == 6  # gallery of top prompts
    # a rerun with other scan settings (as after a new zoo or new labels) scans into a folder of its own and
    # leaves the first run's scan as it was
    first = sorted(p.name for p in tmp_path.glob("scan-*"))
    assert len(first) == 1
    before = (tmp_path / first[0] / "scores.parquet").read_bytes()
    code = main(["demo", "--per-group", "1", "--seeds", "1", "--steps", "10", "--draws", "2", "--scan-prompts", "40",
                 "--scan-samples", "0", "--out", str(tmp_path)])
    assert code == 0
    both = sorted(p.name for p in tmp_path.glob("scan-*"))
    assert len(both) == 2 and first[0] in both
    assert (tmp_path / first[0] / "scores.parquet").read_bytes() == before


def test_nn_ratio_separates_memorized_scenes_from_ordinary_captions(zoo):
    """The best detector of the detection benchmark, on a small slice of the zoo: captions that replicate in
    every labelling seed vs trained ordinary captions of both families that never do."""
    from sklearn.metrics import roc_auc_score

    from diffmem.detectors import NoiseStepEngine, make_detector
    from diffmem.scan import score_chunk

    labels = zoo["labels"]
    positives = [r for r in labels if r["memorized_seeds"] == 4 and r["kind"] in ("signature", "template")][::6][:10]
    negatives = ([r for r in labels if r["kind"] == "generic"][::97][:6]
                 + [r for r in labels if r["family"] == "scene" and r["memorized_seeds"] == 0][:4])
    rows = positives + negatives
    detector = make_detector("nn-ratio", samples=2)
    detector.bind(zoo["model"])  # compare with this zoo's training images, not the default zoo's (run_scan binds)
    scores = score_chunk(NoiseStepEngine(zoo["model"], 1), [detector], [r["caption"] for r in rows])["nn-ratio"]
    y = [1] * len(positives) + [0] * len(negatives)
    assert roc_auc_score(y, scores) >= 0.85, list(zip(y, scores.round(3)))


def test_zoo_ema_against_diffusers_ema_model():
    """The zoo's EMA equals diffusers' EMAModel with update_after_step=-1 to float32 round-off (not bit for bit),
    and differs from EMAModel's defaults (warm-up one step behind, first update copies): why build.py keeps its own."""
    from diffusers.training_utils import EMAModel

    from diffmem.zoo.build import _ema_update

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ours = {k: v.detach().clone() for k, v in net.state_dict().items()}
    aligned = EMAModel(net.parameters(), decay=0.9, update_after_step=-1, use_ema_warmup=False, foreach=False)
    default = EMAModel(net.parameters(), decay=0.9)
    for step in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _ema_update(ours, net, 0.9, step)
        aligned.step(net.parameters())
        default.step(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    for n, s in zip(names, aligned.shadow_params):
        torch.testing.assert_close(ours[n], s, rtol=0, atol=1e-6)
    assert not all(torch.equal(ours[n], s) for n, s in zip(names, aligned.shadow_params))
    assert max(float((ours[n] - s).abs().max()) for n, s in zip(names, default.shadow_params)) > 1e-3
    # by hand for one weight: decay_t = min(0.9, (1 + t) / (10 + t)), the first step already averages
    w = torch.tensor([0.0])
    for t, p in enumerate([1.0, 2.0], start=1):
        d = min(0.9, (1 + t) / (10 + t))
        w = d * w + (1 - d) * p
    layer = torch.nn.Linear(1, 1, bias=False)
    ema = {"weight": torch.zeros(1, 1)}
    for t, p in enumerate([1.0, 2.0], start=1):
        layer.weight.data.fill_(p)
        _ema_update(ema, layer, 0.9, t)
    assert float(ema["weight"]) == pytest.approx(float(w[0]), abs=1e-7)
