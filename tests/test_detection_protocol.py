"""The held-out detection protocol (diffmem.eval.protocol) and the detection benchmark that uses it.

Issue #11: every choice made by looking at labels is made on a development split of the captions and
every figure is reported on a disjoint test split. These tests pin the split (disjoint, deterministic,
stratified, independent of row order), that choices read dev rows only (hand-made cases where dev and
test disagree), the negatives-by-group counts, and the benchmark end to end on a tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffmem.eval.protocol import (
    Entry,
    Target,
    by_negative_group,
    choose_combination,
    choose_on_dev,
    confirmed_or_negative,
    dev_threshold,
    evaluate_split,
    labelled_prompts,
    over_split_seeds,
    reference_captions,
    split_captions,
    strata_of,
)
from diffmem.zoo.prompts import NEGATIVE_GROUPS

ROOT = Path(__file__).resolve().parents[1]


def _captions() -> tuple[list[str], list[str], list[bool]]:
    """60 captions in 5 strata of odd and even sizes (kind, label)."""
    spec = [("generic", False, 21), ("title", False, 20), ("heldout_generic", False, 5), ("signature", True, 11),
            ("signature", False, 3)]
    texts, kinds, labels = [], [], []
    for kind, memorized, n in spec:
        for i in range(n):
            texts.append(f"{kind} {'m' if memorized else 'o'} caption {i}")
            kinds.append(kind)
            labels.append(memorized)
    return texts, kinds, labels


def _module(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ split


def test_split_is_disjoint_stratified_and_deterministic():
    texts, kinds, labels = _captions()
    strata = strata_of(kinds, labels)
    split = split_captions(texts, strata, seed=0)
    dev = {t for t, d in zip(texts, split.dev) if d}
    test = {t for t, d in zip(texts, split.test) if d}
    assert not dev & test and dev | test == set(texts)
    # stratified: every stratum is cut in half (the odd one's extra caption goes to dev)
    for stratum in set(strata):
        n = strata.count(stratum)
        in_dev = sum(d for d, s in zip(split.dev, strata) if s == stratum)
        assert in_dev == int(np.floor(n / 2 + 0.5)), stratum
    # deterministic: the same seed gives the same split, whatever the row order; another seed another one
    assert (split_captions(texts, strata, seed=0).dev == split.dev).all()
    order = np.random.default_rng(1).permutation(len(texts))
    shuffled = split_captions([texts[i] for i in order], [strata[i] for i in order], seed=0)
    assert {texts[i] for i, d in zip(order, shuffled.dev) if d} == dev
    assert {t for t, d in zip(texts, split_captions(texts, strata, seed=1).dev) if d} != dev
    # the record names each side: sizes per stratum, caption digests, the test ids
    ids = [str(i) for i in range(len(texts))]
    record = split.describe(ids, texts)
    assert record["n_dev"] + record["n_test"] == len(texts)
    assert record["test_ids"] == [i for i, d in zip(ids, split.test) if d]
    assert record["strata"]["signature/memorized"] == {"dev": 6, "test": 5}
    assert record["dev_captions_sha256_16"] != record["test_captions_sha256_16"]


def test_split_refuses_duplicate_captions_and_bad_fractions():
    with pytest.raises(Exception, match="unique captions"):
        split_captions(["a", "a"], ["k/not", "k/not"], 0)
    with pytest.raises(ValueError, match="dev_fraction"):
        split_captions(["a", "b"], ["k/not", "k/not"], 0, dev_fraction=1.0)


# ------------------------------------------------------------------------------------------ choose on dev


def _dev_test_disagree() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """8 captions, 4 dev (rows 0-3) and 4 test (rows 4-7), 2 memorized on each side. ``dev-good`` ranks dev
    perfectly and test backwards; ``test-good`` the reverse."""
    labels = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
    dev = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    good = np.where(labels, 1.0, 0.0) + np.arange(8) * 0.01
    scores = {"test-good": np.where(dev, -good, good), "dev-good": np.where(dev, good, -good)}
    return labels, dev, scores


def test_choose_on_dev_reads_dev_rows_only():
    labels, dev, scores = _dev_test_disagree()
    choice = choose_on_dev(scores, labels, dev)
    assert choice.name == "dev-good"
    assert choice.ranking["dev-good"][0] == 1.0 and choice.ranking["test-good"][0] == 0.0
    # whatever the test rows hold, the choice stays: they are never read
    noisy = {k: np.where(dev, v, np.random.default_rng(0).normal(size=8)) for k, v in scores.items()}
    assert choose_on_dev(noisy, labels, dev).name == "dev-good"
    # ties on dev: the cheaper candidate, then the earlier one
    tied = {"a": scores["dev-good"], "b": scores["dev-good"]}
    assert choose_on_dev(tied, labels, dev, cost={"a": 32, "b": 8}).name == "b"
    assert choose_on_dev(tied, labels, dev).name == "a"


def test_choose_combination_by_dev_and_cost():
    labels, dev, scores = _dev_test_disagree()
    x, y, z = "noise-norm", "sharpness", "attention-entropy"  # the combined detector's member names
    members = {x: scores["dev-good"], y: scores["dev-good"] * 0.5, z: scores["test-good"]}
    stats = {m: [0.0, 1.0] for m in members}
    choice = choose_combination(members, stats, labels, dev, sizes=(2,))
    assert choice.members == (x, y) and choice.name == f"{x} + {y}"
    # a cost limit that excludes x leaves y + z
    choice = choose_combination(members, stats, labels, dev, sizes=(2,), cost=lambda s: 40 if x in s else 8,
                                max_cost=32)
    assert choice.members == (y, z)


def test_evaluate_split_chooses_on_dev_and_reports_test():
    labels, dev, scores = _dev_test_disagree()
    kinds = ["signature", "signature", "generic", "title"] * 2
    split = split_captions([f"c{i}" for i in range(8)], ["s"] * 8, 0)
    split = type(split)(0, 0.5, dev, split.strata)  # the hand-made sides above
    entries = [Entry("dev-good", scores["dev-good"], 8, variant_of="d"),
               Entry("test-good", scores["test-good"], 8, variant_of="d"),
               Entry("image", scores["test-good"], 128, training_images=True)]
    report = evaluate_split(entries, labels, kinds, split)
    best = report["chosen_on_dev"]["best_noise_step"]
    assert best["chosen"] == "dev-good" and best["test"]["auroc"] == 0.0
    assert report["chosen_on_dev"]["variants"]["d"]["chosen"] == "dev-good"
    d = report["detectors"]
    assert d["test-good"]["meets_target"] == {"strict": True, "closest": True}  # reported, not chosen
    assert d["test-good"]["eligible_for_target"] and not d["image"]["eligible_for_target"]
    assert d["dev-good"]["dev"]["auroc"] == 1.0 and d["dev-good"]["test"]["auroc"] == 0.0
    # two split seeds: the spread of each detector's test figures
    spread = over_split_seeds({0: report, 1: report})
    assert spread["detectors"]["dev-good"]["auroc"] == {"mean": 0.0, "min": 0.0, "max": 0.0, "spread": 0.0,
                                                        "n_seeds": 2}
    assert spread["best_noise_step"]["chosen"] == {"0": "dev-good", "1": "dev-good"}


def test_target_and_dev_threshold_by_hand():
    m = {"auroc": 0.995, "tpr@0.01fpr": {"strict": 0.88, "closest": 0.91}}
    assert Target().meets(m) == {"strict": False, "closest": True}
    assert Target().meets({"auroc": None}) == {"strict": False, "closest": False}
    assert not Target().eligible(Entry("n", np.zeros(1), 33)) and Target().eligible(Entry("n", np.zeros(1), 32))
    # dev negatives 0.1..0.9 -> threshold 0.9 at FPR 0.1 (share above it 0 <= 0.1); test: one negative above
    labels = np.array([0] * 9 + [0, 0, 1, 1], bool)
    scores = np.array([0.1 * (i + 1) for i in range(9)] + [0.95, 0.2, 0.99, 0.5])
    split = split_captions([f"c{i}" for i in range(13)], ["s"] * 13, 0)
    split = type(split)(0, 0.5, np.arange(13) < 9, split.strata)
    th = dev_threshold(labels, scores, split, fpr=0.1)
    assert th["threshold"] == pytest.approx(0.9) and th["test_fpr"] == 0.5 and th["test_tpr"] == 0.5


def test_negatives_by_group_counts():
    texts, kinds, labels = _captions()
    y = np.array(labels)
    scores = y + np.random.default_rng(0).normal(size=len(y)) * 0.1
    rows = np.ones(len(y), bool)
    groups = by_negative_group(y, scores, kinds, rows, NEGATIVE_GROUPS)
    assert groups["all"]["n_neg"] == 21 + 20 + 5 + 3
    assert groups["ordinary"]["n_neg_by_kind"] == {"generic": 21, "heldout_generic": 5}
    assert groups["once_seen_titles"]["n_neg"] == 20 and groups["once_seen_titles"]["kinds"] == ["title"]
    assert groups["ordinary"]["metrics"]["n_pos"] == 11 and groups["ordinary"]["metrics"]["n_neg"] == 26
    # a subset of rows; a group with no negatives there gets no metrics
    only = np.array([k != "title" for k in kinds])
    assert by_negative_group(y, scores, kinds, rows) == {"all": groups["all"]}  # the default: every negative
    assert by_negative_group(y, scores, kinds, only, NEGATIVE_GROUPS)["once_seen_titles"] == {
        "kinds": [], "n_neg": 0, "n_neg_by_kind": {}, "metrics": None}


def test_labelled_prompts_match_the_zoo_builders_on_the_collapse_labels():
    """One selection for every labels file: on the shipped zoo it is the benchmark's prompt set of today."""
    from diffmem.eval.protocol import read_labels
    from diffmem.zoo.paths import zoo_dir
    from diffmem.zoo.prompts import zoo_prompts, zoo_reference_prompts

    folder = zoo_dir("collapse")
    rows = read_labels(folder / "labels.jsonl")
    reference = reference_captions(rows, ["generic"])
    assert reference == zoo_reference_prompts(folder=folder)
    ours = labelled_prompts(rows, 1000, exclude=set(reference))
    theirs = zoo_prompts(1000, exclude=set(reference), folder=folder)  # the same builder, named by its zoo
    assert (ours.ids, ours.texts, ours.columns) == (theirs.ids, theirs.texts, theirs.columns)
    assert theirs.source == f"zoo:{folder}"
    kept = [r for r in rows if r["caption"] not in set(reference)]
    assert sum(theirs.columns["memorized"]) == sum(r["memorized"] for r in kept)  # every memorized caption
    assert theirs.columns["memorized_seeds"] == [r.get("memorized_seeds") for r in kept
                                                 if str(r["item_id"]) in set(theirs.ids)]


# ------------------------------------------------------------------------------------------ end to end


def _tiny_labels(path: Path) -> Path:
    rows = ([{"caption": f"quiet harbor {i} by mira kessel", "kind": "signature", "memorized": True,
              "replication": 64, "family": "painting"} for i in range(6)]
            + [{"caption": f"silent river {i} poster", "kind": "signature", "memorized": False, "replication": 1,
                "family": "poster"} for i in range(2)]
            + [{"caption": f"a red circle number {i}", "kind": "generic", "memorized": False, "replication": 1,
                "family": "ordinary"} for i in range(8)]
            + [{"caption": f"a blue square number {i}", "kind": "heldout_generic", "memorized": False,
                "replication": 0, "family": "ordinary"} for i in range(2)]
            + [{"caption": f"old mill {i} by ana rossi", "kind": "title", "memorized": False, "replication": 1,
                "family": "painting"} for i in range(8)])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_benchmark_runs_end_to_end_on_a_tiny_model(tiny_sd_folder, tmp_path, monkeypatch, capsys):
    labels = _tiny_labels(tmp_path / "labels.jsonl")
    out = tmp_path / "results" / "detection.json"
    argv = ["detection.py", "--model", str(tiny_sd_folder), "--labels", str(labels), "--draws", "2", "4",
            "--trajectory-steps", "2", "--image-samples", "0", "--reference", "2", "--max-per-kind", "4",
            "--work", str(tmp_path / "work"), "--out", str(out), "--split-seeds", "0", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    detection = _module("detection")
    detection.main()
    record = json.loads(out.read_text())
    # 6 memorized; negatives: 4 of 7 generic (1 is a reference prompt), 2 heldout_generic, 2 signature, 4 of 7 titles
    assert (record["n_pos"], record["n_neg"]) == (6, 12) and record["reference_prompts_excluded"] == 2
    assert record["by_kind"]["title"] == {"positives": 0, "negatives": 4}
    heldout = record["heldout"]
    assert set(heldout["splits"]) == {"0", "1"} and heldout["over_split_seeds"]["split_seeds"] == [0, 1]
    split = heldout["splits"]["0"]
    assert split["split"]["n_dev"] + split["split"]["n_test"] == 18 and len(split["split"]["test_ids"]) == 9
    chosen = split["chosen_on_dev"]
    assert chosen["best_noise_step"]["chosen"] in split["detectors"]
    assert set(chosen["variants"]) == {"noise-norm", "anisotropy", "anisotropy-calibrated"}  # 2 and 4 draws
    assert chosen["combination"]["entry"] in split["detectors"]
    for name, m in split["detectors"].items():
        assert m["test"]["n_pos"] == 3 and m["test"]["n_neg"] == 6, name
        by = m["test_by_negatives"]
        assert (by["all"]["n_neg"], by["ordinary"]["n_neg"], by["once_seen_titles"]["n_neg"]) == (6, 3, 2)
        assert set(m["meets_target"]) == {"strict", "closest"} and isinstance(m["eligible_for_target"], bool)
        # no image detector here: eligible exactly when it costs at most 32 UNet calls per prompt
        assert m["eligible_for_target"] == (m["unet_calls_per_prompt"] <= 32) and not m["training_images"]
    assert set(record["results"]) <= set(__import__("pyarrow.parquet").parquet.read_table(
        out.with_name("detection_scores.parquet")).column_names)

    # resumable: a rerun reuses every finished scan and the reference statistics, and gives the same figures
    capsys.readouterr()
    detection.main()
    assert "reusing the finished scan" in capsys.readouterr().out
    again = json.loads(out.read_text())
    assert again["results"] == record["results"] and again["heldout"] == record["heldout"]

    # another checkpoint in the same --work (here: another fingerprint) scans and standardises anew: no folder and
    # no reference statistics of the first model are reused
    from diffmem.models.model import DiffusionModel

    first_keys = set(json.loads((tmp_path / "work" / "state.json").read_text()))
    monkeypatch.setattr(DiffusionModel, "fingerprint", property(lambda self: "f" * 16))
    detection.main()
    assert "reusing the finished scan" not in capsys.readouterr().out
    new_keys = set(json.loads((tmp_path / "work" / "state.json").read_text())) - first_keys
    assert {k.rsplit("-", 1)[0] for k in new_keys} == {k.rsplit("-", 1)[0] for k in first_keys}  # every group anew
    assert json.loads(out.read_text())["model"]["fingerprint"] == "f" * 16

    # the table renderer reads the heldout section; the existing tables are not touched by it
    tables = _module("tables")
    rows = tables.render("detection-heldout", False, results=out.parent)
    assert len(rows) == 2 + len(split["detectors"]) + 1 and rows[-1].startswith("| best noise-step detector")
    assert len(tables.render("detection-heldout", True, results=out.parent)) == len(rows)


def test_positive_kinds_reuses_the_full_runs_scans_and_drops_only_the_left_out_positives(
        tiny_sd_folder, tmp_path, monkeypatch, capsys):
    """--positive-kinds scans every labelled prompt (as the plain run does) and drops the memorized captions of the
    other kinds afterwards: the two views share each scan and their negatives, and differ only in those captions."""
    labels = _tiny_labels(tmp_path / "labels.jsonl")
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    rows = [dict(r, memorized_seeds=4 if r["memorized"] else 0) for r in rows]
    rows[-1] = dict(rows[-1], memorized=True, memorized_seeds=1)  # a once-seen title matching in one seed of 4
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["detection.py", "--model", str(tiny_sd_folder), "--labels", str(labels), "--draws", "2",
              "--skip", "trajectory", "--image-samples", "0", "--reference", "2", "--max-per-kind", "4",
              "--work", str(tmp_path / "work"), "--split-seeds", "0"]
    detection = _module("detection")
    records = {}
    for view, extra in (("all", []), ("duplication", ["--positive-kinds", "signature"]),
                        ("confirmed", ["--min-memorized-seeds", "2"])):
        out = tmp_path / f"{view}.json"
        monkeypatch.setattr(sys, "argv", [*common, "--out", str(out), *extra])
        capsys.readouterr()
        detection.main()
        printed = capsys.readouterr().out
        records[view] = json.loads(out.read_text())
        records[view]["scores"] = __import__("pyarrow.parquet").parquet.read_table(
            out.with_name(f"{view}_scores.parquet")).to_pydict()
    assert printed.count("reusing the finished scan") == 2  # both noise-step groups, nothing rescanned
    assert "left out 1 memorized captions" in printed
    full = records["all"]
    kept = {i: k for k, i in enumerate(full["scores"]["id"])}
    for view in ("duplication", "confirmed"):  # the kind rule and the seed rule drop the same single-seed title
        dup = records[view]
        assert (full["n_pos"], dup["n_pos"]) == (7, 6) and full["n_neg"] == dup["n_neg"]
        assert full["by_kind"]["title"]["positives"] == 1 and dup["by_kind"]["title"]["positives"] == 0
        for name in dup["results"]:
            if name.startswith("combined"):
                continue
            assert dup["scores"][name] == [full["scores"][name][kept[i]] for i in dup["scores"]["id"]], name
    assert records["confirmed"]["min_memorized_seeds"] == 2


def test_min_memorized_seeds_keeps_negatives_and_confirmed_positives_only():
    from diffmem.eval.protocol import labelled_prompts

    rows = [{"caption": f"c{i}", "kind": kind, "memorized": seeds > 0, "memorized_seeds": seeds}
            for i, (kind, seeds) in enumerate([("signature", 4), ("signature", 1), ("title", 2), ("title", 0),
                                               ("generic", 0)])]
    rows.append({"caption": "old", "kind": "title", "memorized": True})  # labels written before the seed count
    prompts = labelled_prompts(rows)
    assert confirmed_or_negative(prompts, None, 1) == [0, 1, 2, 3, 4, 5]
    assert confirmed_or_negative(prompts, None, 2) == [0, 2, 3, 4]
    assert confirmed_or_negative(prompts, ["signature"], 2) == [0, 3, 4]
    assert confirmed_or_negative(prompts, ["signature"], 1) == [0, 1, 3, 4]


def test_image_space_detectors_scan_the_zoos_own_training_images(smoke_sd_zoo, tmp_path, monkeypatch):
    """The image-space groups (nn-ratio, nn-margin) are bound to the scanned zoo before their settings are
    digested: without that, their ``config()`` refused as unbound and the benchmark stopped at the first of them.
    On a tiny SD-like zoo (the session's smoke build, copied and labelled here), the benchmark's stored scores are
    the ones the library's scan gives for the same prompts against that zoo's own training images."""
    import pyarrow.parquet as pq
    from tiny_sd_zoo import copy_zoo, label_in_place

    from diffmem.cli.main import main
    from diffmem.detectors import make_detector
    from diffmem.models import load_model
    from diffmem.prompts import prompts_from_list
    from diffmem.scan import ScanSettings, run_scan

    zoo = copy_zoo(smoke_sd_zoo, tmp_path / "zoo")
    label_in_place(main, zoo, "--labeller", "threshold", "--seeds", "1", "--steps", "2", "--quiet")
    work = tmp_path / "work"
    monkeypatch.setattr(sys, "argv", [
        "detection.py", "--model", str(zoo / "pipeline"), "--labels", str(zoo / "labels.jsonl"), "--only", "image-",
        "--limit", "6", "--image-samples", "1",
        "--margin-samples", "1", "--draws", "1", "--reference", "2", "--work", str(work),
        "--out", str(tmp_path / "detection.json")])
    _module("detection").main()
    state = json.loads((work / "state.json").read_text())
    scanned = {key.split("-s")[0] for key in state if key.startswith("image-")}
    assert scanned == {"image-nn-ratio", "image-nn-margin"}, sorted(state)
    model = load_model(str(zoo / "pipeline"))
    for name, options in (("nn-ratio", {"samples": 1, "steps": 10, "stop_after": 4}),
                          ("nn-margin", {"samples": 1, "steps": 10, "stop_after": 8})):
        (merged,) = work.glob(f"image-{name}-*/scores.parquet")  # the finished scan's merged parts
        table = pq.read_table(merged)
        texts = table.column("text").to_pylist()
        direct = pq.read_table(run_scan(model, prompts_from_list(texts), [make_detector(name, **options)],
                                        tmp_path / f"direct-{name}", ScanSettings(n_draws=1), progress=False))
        assert len(texts) == 6
        np.testing.assert_allclose(table.column(name).to_numpy(), direct.column(name).to_numpy(), rtol=1e-6)
