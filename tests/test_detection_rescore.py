"""The shipped detection results regenerated from their shipped per-prompt scores: every detector's held-out
test figures are what its scores give against its labels, on both split seeds: the zoo's labels
(`detection_sd_verdicts.json`) and the earlier 4-seed threshold labels (kept in `experiments/`, with
the two other views of that scan, `..._duplication` and `..._confirmed`, whose every headline figure is
what their own scores files give)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from benchmark_script import load_benchmark

from diffmem.eval.detection import detection_metrics
from diffmem.eval.protocol import metrics_or_none, read_labels, split_captions, strata_of, z_combine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LABELS = RESULTS / "experiments" / "zoo_sd_threshold_labels.jsonl"  # the labels these views were judged on


def test_detection_against_the_threshold_labels_comes_from_its_scores():
    rescore = load_benchmark("detection_rescore").rescore
    record = RESULTS / "experiments" / "detection_sd_threshold_labels.json"
    shipped = json.loads(record.read_text())
    seeds = [int(s) for s in shipped["heldout"]["splits"]]
    got = rescore(RESULTS / "detection_sd_scores.parquet", record,
                  RESULTS / "experiments" / "zoo_sd_threshold_labels.jsonl", seeds)
    assert (got["n_pos"], got["n_neg"]) == (shipped["n_pos"], shipped["n_neg"])
    compared = 0
    for seed, report in shipped["heldout"]["splits"].items():
        for name, m in report["detectors"].items():
            if name not in got["splits"][seed]["detectors"]:
                continue  # the combination chosen on dev is built by the benchmark, not a scores column
            test = got["splits"][seed]["detectors"][name]["test"]
            assert test["auroc"] == pytest.approx(m["test"]["auroc"], abs=1e-12), (seed, name)
            assert test["tpr@0.01fpr"] == m["test"]["tpr@0.01fpr"], (seed, name)
            compared += 1
    assert compared >= 2 * 9


def test_detection_against_the_zoo_labels_is_the_rescore_of_its_scores():
    """`detection_sd_verdicts.json` is exactly what `detection_rescore.py` computes from the shipped scores and the
    zoo's shipped labels: every split, detector, band and count."""
    from diffmem.provenance import portable_json

    module = load_benchmark("detection_rescore")
    shipped = json.loads((RESULTS / "detection_sd_verdicts.json").read_text())
    got = module.rescore(RESULTS / "detection_sd_scores.parquet",
                         RESULTS / "experiments" / "detection_sd_threshold_labels.json",
                         ROOT / "diffmem" / "zoo" / "checkpoint_sd" / "labels.jsonl", [0, 1])
    assert json.loads(portable_json(got)) == shipped
    assert shipped["labels"] == "labels.jsonl" and sum(shipped["positives_by_band"].values()) == shipped["n_pos"]


# The two other views of the same scan: memorization by duplication (positives of the duplicated kinds only) and
# confirmed positives (reproduced in at least two labelling seeds). Each ships its own per-prompt scores; every
# headline figure of its JSON is recomputed from them here and compared exactly.
VIEWS = ["experiments/detection_sd_threshold_labels_duplication", "experiments/detection_sd_threshold_labels_confirmed"]


@dataclass(frozen=True)
class View:
    """A shipped detection record beside what its scores file and the zoo's labels say."""

    path: Path  # the record's JSON
    record: dict
    ids: list[str]
    texts: list[str]
    y: np.ndarray  # memorized
    kinds: np.ndarray
    families: np.ndarray
    scores: dict[str, np.ndarray]  # score column -> per-prompt score


@pytest.fixture(scope="module", params=VIEWS)
def view(request) -> View:
    """One view's record, scores and labels, read once for every test of the view."""
    path = RESULTS / f"{request.param}.json"
    record = json.loads(path.read_text())
    table = pq.read_table(RESULTS / record["scores_file"])
    rows = {r["caption"]: r for r in read_labels(LABELS)}
    texts = table.column("text").to_pylist()
    assert all(t in rows for t in texts), "every scored caption is labelled"
    scores = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
              for c in table.column_names if c not in ("id", "text")}
    return View(path, record, table.column("id").to_pylist(), texts,
                np.array([bool(rows[t]["memorized"]) for t in texts]), np.array([rows[t]["kind"] for t in texts]),
                np.array([rows[t]["family"] for t in texts]), scores)


def test_detection_view_counts_and_every_prompt_figures_come_from_its_scores(view):
    """`n_pos`, `n_neg`, `by_kind` and each detector's `results` (every labelled prompt, nothing held out)."""
    rec, y, kinds = view.record, view.y, view.kinds
    assert (int(y.sum()), int((~y).sum())) == (rec["n_pos"], rec["n_neg"])
    assert {k: {"positives": int((y & (kinds == k)).sum()), "negatives": int((~y & (kinds == k)).sum())}
            for k in sorted(set(kinds))} == rec["by_kind"]
    if rec["positive_kinds"] is not None:  # the duplication view: no positive of another kind is left in
        assert set(kinds[y]) <= set(rec["positive_kinds"])
    assert set(view.scores) == set(rec["results"])
    mixed = [f for f in sorted(set(view.families)) if y[view.families == f].any() and (~y[view.families == f]).any()]
    for name, shipped in rec["results"].items():
        s = view.scores[name]
        got = detection_metrics(y, s)
        got["by_kind_of_positive"] = {k: detection_metrics(y[(~y) | (kinds == k)], s[(~y) | (kinds == k)])["auroc"]
                                      for k in sorted(set(kinds[y]))}
        got["within_family"] = {f: detection_metrics(y[view.families == f], s[view.families == f])["auroc"]
                                for f in mixed}
        assert {k: shipped[k] for k in got} == got, name


def test_detection_view_heldout_figures_come_from_its_scores(view):
    """Each split seed: the split itself, and every scored detector's dev, test, per-negative-group and dev-threshold
    figures, as `detection_rescore.py` recomputes them from the scores file."""
    rescore = load_benchmark("detection_rescore").rescore
    shipped = view.record["heldout"]
    got = rescore(RESULTS / view.record["scores_file"], view.path, LABELS, [int(s) for s in shipped["splits"]],
                  shipped["dev_fraction"])
    compared = 0
    for seed, report in shipped["splits"].items():
        split = split_captions(view.texts, strata_of(view.kinds.tolist(), view.y.tolist()), int(seed),
                               shipped["dev_fraction"])
        assert split.describe(view.ids, view.texts) == report["split"], seed
        for name, m in got["splits"][seed]["detectors"].items():
            for key in ("dev", "test", "test_by_negatives", "dev_threshold_at_1%fpr"):
                assert m[key] == report["detectors"][name][key], (seed, name, key)
            compared += 1
    assert compared == 2 * len(view.scores)


def test_detection_view_dev_chosen_combination_comes_from_its_scores(view):
    """The combination chosen on dev: every candidate subset's dev ranking, and the chosen one's test figures,
    recomputed from the members' scores and the reference statistics the record ships."""
    shipped = view.record["heldout"]
    stats = shipped["combination_candidates"]["stats"]
    column = {c.split(" (")[0]: c for c in shipped["combination_candidates"]["members"]}
    members = {m: view.scores[column[m]] for m in stats}
    for seed, report in shipped["splits"].items():
        split = split_captions(view.texts, strata_of(view.kinds.tolist(), view.y.tolist()), int(seed),
                               shipped["dev_fraction"])
        choice = report["chosen_on_dev"]["combination"]
        for subset, ranked in choice["dev_ranking"].items():
            dev = metrics_or_none(view.y[split.dev], z_combine(members, stats, subset.split(" + "))[split.dev])
            assert [dev["auroc"], dev["tpr@0.01fpr"]["strict"]] == ranked, (seed, subset)
        assert choice["dev_ranking"][choice["chosen"]] == max(choice["dev_ranking"].values())
        chosen = z_combine(members, stats, choice["members"])
        assert metrics_or_none(view.y[split.test], chosen[split.test]) == \
            report["detectors"][choice["entry"]]["test"], seed
