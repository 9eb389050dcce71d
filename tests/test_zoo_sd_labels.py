"""Loading an SD-like zoo's data by the corpus its zoo.json names, its extraction labels (per-family null
thresholds, once-seen titles sampled), the labelling rule on hand-made generations, and the after-training gates
script on a smoke zoo (a tiny build, a few steps of every stage, as tests/test_zoo_sd_build.py makes)."""

from __future__ import annotations

import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_sd_zoo import TINY_SD, copy_zoo, label_in_place

from diffmem.cli.deepssim_commands import zoo_images_and_groups
from diffmem.cli.main import main
from diffmem.eval.matching import SSIMMatcher
from diffmem.eval.similarity import ssim_pairs
from diffmem.zoo.build import TrainingImages
from diffmem.zoo.corpus import ZooItem
from diffmem.zoo.labels import LabelConfig, label_generations, null_thresholds
from diffmem.zoo.load import (
    ZooTrainingSet,
    load_corpus,
    load_labels,
    zoo_corpus_name,
    zoo_training_images,
    zoo_training_set,
)
from diffmem.zoo.sd_corpus import SDItem, build_sd_corpus, render_scene, sample_scene
from diffmem.zoo.sd_gates import (
    gate,
    mean_pairwise_ssim,
    null_exceedance,
    null_from_summary,
    pairwise_ssim,
    sd_gates,
)
from diffmem.zoo.sd_labels import SD_FAMILIES, SD_SCHEME, SDLabelConfig, label_sd_zoo, select_sd_captions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, smoke_sd_zoo) -> Path:
    """This module's copy of the session's smoke build (its tests relabel it in place)."""
    return copy_zoo(smoke_sd_zoo, tmp_path_factory.mktemp("sdlabels") / "zoo_sd")


def test_load_corpus_follows_the_zoo_json_corpus(zoo, tmp_path):
    items = load_corpus(zoo)
    assert zoo_corpus_name(zoo) == "sd"
    assert all(isinstance(it, SDItem) for it in items)
    assert [it.caption for it in items] == [it.caption for it in build_sd_corpus(TINY_SD)]
    data = zoo_training_images(zoo)
    expected = TrainingImages.for_corpus("sd", build_sd_corpus(TINY_SD))
    assert torch.equal(data.pixels, expected.pixels)
    images, groups = zoo_images_and_groups(zoo)  # the deepssim command's zoo images, same corpus
    assert torch.equal(images, (expected.pixels + 1) / 2) and np.array_equal(groups, expected.item_of_image())
    ts = zoo_training_set(zoo)
    assert ts.reference.shape == ts.images.shape == (len(expected.pixels), 3, 32, 32)
    signature = next(it for it in items if it.kind == "signature" and it.replication == 16)
    assert len(ts.images_of_item[signature.item_id]) == 1
    # a record without a corpus name was written before the SD corpus: the collapse zoo
    (tmp_path / "zoo.json").write_text(json.dumps({"config": {"corpus": {}}}))
    assert zoo_corpus_name(tmp_path) == "collapse"
    from diffmem.zoo.paths import zoo_dir

    collapse = zoo_dir("collapse")
    assert isinstance(load_corpus(collapse)[0], ZooItem)
    assert load_labels(collapse)[0]["family"] in {"object", "scene"}


def test_title_selection_is_fixed_and_keeps_every_other_caption():
    items = build_sd_corpus(TINY_SD)
    chosen = select_sd_captions(items, titles=10, seed=0)
    assert chosen == select_sd_captions(items, titles=10, seed=0)
    assert sum(it.kind == "title" for it in chosen) == 10
    assert [it for it in chosen if it.kind != "title"] == [it for it in items if it.kind != "title"]
    assert [it.item_id for it in chosen] == sorted(it.item_id for it in chosen)
    assert select_sd_captions(items, titles=10, seed=1) != chosen


def test_zoo_label_writes_one_row_per_selected_caption(zoo):
    label_in_place(main, zoo, "--labeller", "threshold", "--seeds", "1", "--steps", "2")
    items = load_corpus(zoo)
    rows = load_labels(zoo)
    assert [r["caption"] for r in rows] == [it.caption for it in items]  # 80 once-seen titles < 1,000: all
    summary = json.loads((zoo / "zoo.json").read_text())["labels"]
    thresholds = {fam: t["threshold"] for fam, t in summary["thresholds"].items()}
    assert set(thresholds) == set(SD_FAMILIES)
    for row, item in zip(rows, items):
        assert row["family"] == item.family and row["kind"] == item.kind and row["replication"] == item.replication
        assert row["threshold"] == round(thresholds[item.family], 4)
        assert row["memorized"] == (row["ssim_nn"] > row["threshold"]) or abs(row["ssim_nn"] - row["threshold"]) < 1e-3
        assert {"caption", "kind", "memorized", "replication", "match", "ssim_nn", "group"} <= set(row)
        assert (row["fidelity"] is not None) == (item.family == "ordinary")
    assert summary["selection"]["labelled"] == len(items) and summary["label_config"]["titles"] == 1000

    model_cfg = SDLabelConfig(seeds_per_prompt=1, num_inference_steps=2, titles=5, null_captions=10)
    from diffmem.models.loader import load_model

    rows, summary = label_sd_zoo(load_model(zoo / "pipeline"), items, None, zoo_training_set(zoo), model_cfg,
                                 progress=False)
    assert len(rows) == sum(it.kind != "title" for it in items) + 5
    assert sum(r["kind"] == "title" for r in rows) == 5 and summary["selection"]["titles"] == 5
    assert {t["n"] for t in summary["thresholds"].values()} == {10}  # 10 null captions per family


def test_labelling_rule_on_hand_made_generations():
    """An exact training image is memorized (its own); a fresh render of a caption's Named factors is not.

    The training set is the raw renders (an identity VAE), so the statistic is the labeller's, undisturbed."""
    items = build_sd_corpus(TINY_SD)
    data = TrainingImages.for_corpus("sd", items)
    images = (data.pixels + 1) / 2
    item_of_image = data.item_of_image()
    images_of_item: dict[int, list[int]] = {}
    for img, item in enumerate(item_of_image.tolist()):
        images_of_item.setdefault(item, []).append(img)
    ts = ZooTrainingSet(images, images, item_of_image, images_of_item)
    cfg = LabelConfig(seeds_per_prompt=2, null_captions=40)
    matcher = SSIMMatcher(cfg.candidates).fit(ts.reference)
    thresholds = null_thresholds(items, matcher, cfg, lambda x: x, SD_SCHEME)
    assert set(thresholds) == set(SD_FAMILIES)
    for fam, t in thresholds.items():  # up to 40 trained captions per family, best of 2 fresh renders each
        trained = sum(it.trained and SD_SCHEME.family_of(it) == fam for it in items)
        assert t["n"] == min(40, trained), fam
        # the 99% quantile of the null lies between its median and its maximum, below a copy's SSIM of 1
        assert t["median"] <= t["threshold"] <= t["max"] < 0.99, fam

    title = next(it for it in items if it.kind == "title")
    signature = next(it for it in items if it.kind == "signature" and it.replication == 64)
    generic = next(it for it in items if it.kind == "generic" and len(it.image_seeds) > 1)
    own = [images[images_of_item[it.item_id][0]] for it in (title, signature) for _ in range(2)]
    fresh = [render_scene(sample_scene(generic.named, 10**6 + s)) for s in range(2)]
    gen = torch.cat([torch.stack(own), torch.from_numpy(np.stack(fresh)).permute(0, 3, 1, 2).float() / 255])
    rows = label_generations(gen, [title, signature, generic], ts, matcher, thresholds, 2, None, SD_SCHEME)
    assert [r["memorized"] for r in rows] == [True, True, False]
    assert [r["match"] for r in rows] == ["own", "own", "none"]
    assert rows[0]["ssim_nn"] == 1.0 and rows[0]["family"] == title.family and rows[2]["family"] == "ordinary"
    assert rows[2]["ssim_nn"] <= rows[2]["threshold"]


def test_pairwise_ssim_and_gate():
    x = torch.rand(1, 3, 32, 32)
    assert mean_pairwise_ssim(x.repeat(4, 1, 1, 1)) == pytest.approx(1.0)
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    per = pairwise_ssim(torch.cat([x.repeat(3, 1, 1, 1), noise]), 3)
    # the second group's value is the mean SSIM of its three pairs, each computed on its own
    pairs = ssim_pairs(noise[[0, 0, 1]], noise[[1, 2, 2]])
    assert per[0] == pytest.approx(1.0) and per[1] == pytest.approx(float(pairs.double().mean()), abs=1e-6)
    assert per[1] < 0.5  # independent noise images are far from one picture
    assert gate(0.3, "<=", 0.5) == {"value": 0.3, "target": "<= 0.5", "pass": True}
    assert gate(None, ">=", 0.9)["pass"] is False


def test_null_exceedance_is_the_binomial_tail_of_the_labellers_false_positives():
    """Build 9's ordinary-caption gate: 2 of 147 flagged against <= 1% with a 1% null: an ideal generaliser
    would fail it in 1 - 0.99^147 - 147 (0.01) 0.99^146 of builds (docs/zoo-sd.md), and reach 2 as often."""
    null = null_exceedance(2, 147, 0.01, 0.01)
    p_fail = 1 - 0.99**147 - 147 * 0.01 * 0.99**146
    assert null["allowed"] == 1 and null["expected_under_null"] == pytest.approx(1.47)
    assert null["p_fail_under_null"] == pytest.approx(p_fail, abs=1e-4) == pytest.approx(0.4329, abs=1e-4)
    assert null["p_at_least_observed_under_null"] == null["p_fail_under_null"]
    # nothing flagged is always possible; 0.1 x 30 allows exactly 3 despite float round-off
    assert null_exceedance(0, 16, 0.01, 0.1)["p_at_least_observed_under_null"] == 1.0
    assert null_exceedance(0, 30, 0.01, 0.1)["allowed"] == 3
    rows = [{"kind": "generic", "memorized": i < 2} for i in range(147)]
    gates = sd_gates(rows, np.array([0.3]), np.array([0.95]), {"all": 0.9}, null_rate=0.01)
    # with the labeller's null rate the gate is a binomial test: 2 of 147 is what chance gives, so it passes
    assert gates["ordinary_captions"]["value"] == 0.0136 and gates["ordinary_captions"]["pass"]
    assert gates["ordinary_captions"]["null"] == null and "null" not in gates["diversity_ordinary"]
    assert "null" not in sd_gates(rows, np.array([0.3]), np.array([0.95]), {"all": 0.9})["ordinary_captions"]
    with pytest.raises(ValueError, match="count <= n"):
        null_exceedance(3, 2, 0.01, 0.01)


def test_null_from_a_gates_files_label_summary_equals_the_null_it_stored():
    """The shipped zoo's second label draw stored each upper bound's null; recomputing it from the same file's
    label summary (how tables.py reads files written before the null was stored) gives the same record."""
    path = ROOT / "benchmarks" / "results" / "experiments" / "zoo_sd_gates_build7_fresh_label_seeds.json"
    record = json.loads(path.read_text())
    stored = {k: g["null"] for k, g in record["gates"].items() if "null" in g}
    assert set(stored) == {"memorized_1x", "lookalike_titles", "ordinary_captions"}
    assert null_from_summary(record["labels"]) == stored
    assert stored["ordinary_captions"]["count"] == 2 and stored["lookalike_titles"]["count"] == 7


def _run_gates(monkeypatch, *argv: str) -> dict:
    out = Path(argv[argv.index("--out") + 1])
    monkeypatch.setattr(sys, "argv", ["zoo_gates.py", "--smoke", *argv])
    runpy.run_path(str(ROOT / "benchmarks" / "zoo_gates.py"), run_name="__main__")
    return json.loads(out.read_text())


def test_gates_script_smoke(zoo, tmp_path, monkeypatch):
    result = _run_gates(monkeypatch, "--model", str(zoo), "--out", str(tmp_path / "gates.json"))
    expected = {"diversity_ordinary", "diversity_memorized", "memorized_1x", "memorized_16x", "memorized_64x",
                "memorized_rises_with_rate", "lookalike_titles", "ordinary_captions", "named_fidelity", "template"}
    assert expected <= set(result["gates"])
    null_aware = {"count", "n", "allowed", "null_rate", "p_at_least_observed_under_null"}
    for name, g in result["gates"].items():
        extra = null_aware if name == "ordinary_captions" else set()  # a binomial test against the null
        assert set(g) - {"null"} - extra == {"value", "target", "pass"} and isinstance(g["pass"], bool), name
        assert g["value"] is not None, name
    # the SD labeller's null rate rides on the upper-bound gates: the same captions the gate's fraction counts
    null = result["gates"]["ordinary_captions"]["null"]
    assert null["null_rate"] == pytest.approx(0.01) and null["count"] == round(
        result["gates"]["ordinary_captions"]["value"] * null["n"])
    # --smoke labels 4 generic, 2 heldout-generic, 4 heldout-signature, 2 template, 2 heldout-template and 4 title
    # captions (fewer where the corpus has fewer) and every signature
    smoke = {"generic": 4, "heldout_generic": 2, "heldout_signature": 4, "template": 2, "heldout_template": 2,
             "title": 4}
    kinds = Counter(it.kind for it in load_corpus(zoo))
    assert result["smoke"] and result["sizes"]["steps"] == 2
    assert result["sizes"]["labelled_captions"] == sum(min(smoke.get(k, n), n) for k, n in kinds.items())
    assert result["passed"] == sum(g["pass"] for g in result["gates"].values())
    assert result["corpus"] == "sd" and result["labels_source"] == "a sample labelled here"
    # the zoo's own labels instead of a sample: the memorization gates are its labels' fractions
    label_in_place(main, zoo, "--labeller", "threshold", "--seeds", "2", "--steps", "2")
    own = _run_gates(monkeypatch, "--model", str(zoo), "--labels-from-zoo", "--out", str(tmp_path / "own.json"))
    rows = load_labels(zoo)
    generic = [r["memorized"] for r in rows if r["kind"] == "generic"]
    assert own["labels_source"] == "the zoo's labels.jsonl" and own["sizes"]["labelled_captions"] == len(rows)
    assert own["gates"]["ordinary_captions"]["value"] == round(float(np.mean(generic)), 4)


def test_gates_script_fresh_label_seeds_labels_every_ordinary_caption_with_unused_seeds(zoo, tmp_path,
                                                                                     monkeypatch):
    result = _run_gates(monkeypatch, "--model", str(zoo), "--fresh-label-seeds", "--out", str(tmp_path / "f.json"))
    generic = [it for it in load_corpus(zoo) if it.kind == "generic"]
    assert result["labels_source"] == "a sample labelled here, generation seeds disjoint from labels.jsonl's"
    assert result["labels"]["label_config"]["seed_offset"] == 5 * 10**8 and result["sizes"]["generic"] is None
    assert result["labels"]["by_kind"]["generic"]["n"] == len(generic)
    with pytest.raises(SystemExit) as refused:
        _run_gates(monkeypatch, "--model", str(zoo), "--fresh-label-seeds", "--labels-from-zoo",
                   "--out", str(tmp_path / "g.json"))
    assert refused.value.code == 2 and not (tmp_path / "g.json").exists()


def test_gates_script_on_the_collapse_zoo_reads_its_labels(tmp_path, monkeypatch):
    from diffmem.zoo.paths import zoo_dir

    result = _run_gates(monkeypatch, "--model", "zoo:collapse", "--out", str(tmp_path / "collapse.json"))
    record = json.loads((zoo_dir("collapse") / "zoo.json").read_text())["labels"]
    assert result["corpus"] == "collapse" and result["labels_source"] == "the zoo's labels.jsonl"
    by_rate = {int(k): v["memorized"] for k, v in record["signature_by_replication"].items()}
    assert result["gates"]["memorized_64x"]["value"] == round(by_rate[64], 4)
    assert result["gates"]["named_fidelity"]["value"] == round(record["generic_fidelity"]["generic"], 4)
    per_caption = result["diversity"]["ordinary_per_caption"]
    assert len(per_caption) == result["sizes"]["diversity_captions"]["ordinary"] > 0
    assert result["gates"]["diversity_ordinary"]["value"] == pytest.approx(np.mean(per_caption), abs=1e-4)


def test_zoo_label_titles_flag_sets_how_many_once_seen_titles_are_labelled(zoo):
    label_in_place(main, zoo, "--labeller", "threshold", "--seeds", "1", "--steps", "2", "--titles", "10")
    items, rows = load_corpus(zoo), load_labels(zoo)
    titles = [r for r in rows if r["kind"] == "title"]
    assert len(titles) == 10 and len(rows) == sum(it.kind != "title" for it in items) + 10


def test_gates_second_sample_is_disjoint_from_the_first():
    """--disjoint-from: the ordinary fidelity captions of a second sample share none with the first's (the check
    of gates a build was chosen on); the labelled and memorized sets are drawn as before."""
    import dataclasses

    gates = runpy.run_path(str(ROOT / "benchmarks" / "zoo_gates.py"))
    items = build_sd_corpus(TINY_SD)
    sizes = gates["Sizes"](diversity_ordinary=5)
    first = gates["choose"](items, sizes)[1]
    exclude = frozenset(it.caption for it in first)
    again = gates["choose"](items, sizes)[1]
    second = gates["choose"](items, dataclasses.replace(sizes, sample_seed=1), exclude)[1]
    assert [it.caption for it in again] == [it.caption for it in first]  # the same seed draws the same sample
    assert len(second) == 5 and not exclude & {it.caption for it in second}
    assert all(it.kind == "generic" for it in second)


def test_verdict_labels_on_a_smoke_zoo_are_the_binomial_and_bh_decision(zoo, tmp_path):
    """The zoo labelled as `diffmem extract --null-prompts` decides: each caption's p-value is the binomial
    tail at its family's null rate, q-values are BH over every labelled caption, memorized iff q <= 0.05; the
    never-trained captions are judged by cross-fitting; nothing is written into the zoo; a rerun resumes."""
    from scipy import stats

    from diffmem.models import load_model
    from diffmem.tasks.zoo import zoo_training_index
    from diffmem.zoo.verdict_labels import NULL_KINDS, ZooVerdictConfig, corpus_rows, label_zoo_by_verdicts

    before = sorted(p.name for p in zoo.iterdir())
    cfg = ZooVerdictConfig(generations=2, steps=3, min_null_generations=20, null_level=0.1, titles=3,
                           batch_size=64)
    every = corpus_rows(zoo)  # two captions of each trained kind, every never-trained one, the titles sampled
    rows = [r for r in every if r["kind"] in NULL_KINDS or r["kind"] == "title"
            or r in [x for x in every if x["kind"] == r["kind"]][:2]]
    model, index = load_model(zoo / "pipeline"), zoo_training_index(zoo=zoo, threshold=0.5)
    labels, summary = label_zoo_by_verdicts(model, rows, index, tmp_path / "v", cfg, progress=False)
    assert sorted(p.name for p in zoo.iterdir()) == before
    tested = [r for r in labels if r["null_role"] == "tested"]
    crossfit = [r for r in labels if r["null_role"] == "cross-fit"]
    assert {r["kind"] for r in crossfit} <= set(NULL_KINDS) and len(crossfit) == sum(
        r["kind"] in NULL_KINDS for r in rows)
    assert sum(r["kind"] == "title" for r in labels) == 3 and all(r["generations"] == 2 for r in labels)
    for r in tested:
        rate = summary["nulls"][r["family"]]["rate"]
        expected = 1.0 if r["matching"] == 0 else stats.binom.sf(r["matching"] - 1, 2, rate)
        assert r["p_value"] == pytest.approx(expected, rel=1e-4)
    q = stats.false_discovery_control([r["p_value"] for r in labels], method="bh")
    assert [r["q_value"] for r in labels] == pytest.approx(q.tolist())
    assert [r["memorized"] for r in labels] == [bool(v <= 0.05) for v in q]
    assert sum(b["n"] for b in summary["by_replication_band"].values()) == len(labels)
    again, _ = label_zoo_by_verdicts(model, rows, index, tmp_path / "v", cfg, progress=False)
    assert again == labels
    # shipped as a zoo's labels: rows in item order, each family's null threshold where readers look for it
    from diffmem.cli.zoo_commands import format_summary
    from diffmem.zoo.verdict_labels import labels_record

    assert [r["item_id"] for r in labels] == sorted(r["item_id"] for r in labels)
    record = labels_record(summary)
    assert record["labeller"] == "verdicts" and record["label_config"]["generations"] == 2
    assert {f: t["threshold"] for f, t in record["thresholds"].items()} == {
        f: n["threshold"] for f, n in summary["nulls"].items()}
    text = format_summary(record)
    assert text.splitlines()[0] == summary["sentence"]
    assert f"{'title':<20} {3:>8}  {summary['by_kind']['title']['memorized']:>9}" in text.splitlines()


def test_more_titles_extend_a_smaller_labelling_run():
    """Titles are generated in nested steps: a 5-title run reuses the 3-title run's folder ``tested`` (every other
    caption and the same first 3 titles) and adds the next 2 titles in a folder of their own."""
    from diffmem.zoo.verdict_labels import NULL_KINDS, select_rows, tested_groups

    rows = [{"item_id": i, "kind": "title" if i % 2 else ("generic" if i % 3 else "heldout_generic")}
            for i in range(40)]
    small = tested_groups(rows, 3, (3,), seed=0)
    large = tested_groups(rows, 5, (3,), seed=0)
    assert [name for name, _ in small] == ["tested"] and [name for name, _ in large] == ["tested",
                                                                                          "tested-titles-3-5"]
    assert large[0][1] == small[0][1]
    assert [r for r in select_rows(rows, 3, 0) if r["kind"] not in NULL_KINDS] == small[0][1]
    every = {r["item_id"] for _, members in large for r in members}
    assert every == {r["item_id"] for r in select_rows(rows, 5, 0) if r["kind"] not in NULL_KINDS}
    assert len(large[1][1]) == 2 and all(r["kind"] == "title" for r in large[1][1])
    assert sum(len(m) for _, m in large) == len(every)  # no caption generated twice


def test_the_ordinary_caption_gate_fails_only_beyond_the_labellers_null():
    """147 ordinary captions at the labeller's 1% null: 4 flagged passes (P(>= 4) = 0.061), 5 fails (0.0166); a
    model that only generalises fails it with probability P(Binomial(147, 0.01) >= 5) <= 5%, not 43%."""
    from scipy.stats import binom

    from diffmem.zoo.sd_gates import null_aware_gate

    four, five = null_aware_gate(4, 147, 0.01), null_aware_gate(5, 147, 0.01)
    assert four["pass"] and four["p_at_least_observed_under_null"] == pytest.approx(binom.sf(3, 147, 0.01), abs=1e-4)
    assert not five["pass"] and five["p_at_least_observed_under_null"] == pytest.approx(0.0166, abs=1e-4)
    assert four["allowed"] == 4 and binom.sf(4, 147, 0.01) <= 0.05
    rows = [{"kind": "generic", "memorized": i < 2, "replication": 1} for i in range(147)]
    gates = sd_gates(rows, np.array([0.3]), np.array([0.95]), {"all": 0.9}, null_rate=0.01)
    assert gates["ordinary_captions"]["pass"] and gates["ordinary_captions"]["count"] == 2  # build 9's 2 of 147
    assert not sd_gates(rows, np.array([0.3]), np.array([0.95]), {"all": 0.9})["ordinary_captions"]["pass"]
