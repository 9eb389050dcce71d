"""The shipped benchmark tables regenerate from the shipped per-prompt scores.

``benchmarks/detection.py`` and ``benchmarks/extraction.py`` write every prompt's scores beside their
JSON (zstd Parquet). These tests recompute the tables' figures from those files (through
``diffmem eval detect`` for the detection table, as the docs tell a reader to) and require them to
equal the figures in the JSON, so a figure quoted from the JSON is one a reader can reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffmem.cli.main import main
from diffmem.eval.detection import detection_metrics

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
LABELS = Path(__file__).resolve().parents[1] / "diffmem" / "zoo" / "checkpoint" / "labels.jsonl"
SD_LABELS = Path(__file__).resolve().parents[1] / "diffmem" / "zoo" / "checkpoint_sd" / "labels.jsonl"


def _labels_by_caption(path: Path = LABELS) -> dict[str, dict]:
    return {r["caption"]: r for r in map(json.loads, path.read_text().splitlines())}


def _same_metrics(got: dict, want: dict) -> None:
    """AUROC, counts and both TPR@FPR estimators at both targets agree to float round-off."""
    assert got["auroc"] == pytest.approx(want["auroc"], abs=1e-12)
    assert (got["n_pos"], got["n_neg"]) == (want["n_pos"], want["n_neg"])
    for target in ("tpr@0.01fpr", "tpr@0.001fpr"):
        for estimator in ("strict", "closest"):
            assert got[target][estimator] == pytest.approx(want[target][estimator], abs=1e-12), (target, estimator)


@pytest.fixture(scope="module")
def detection():
    record = json.loads((RESULTS / "detection.json").read_text())
    if not record.get("scores_file"):
        pytest.skip("detection.json predates per-prompt scores")
    scores = pq.read_table(RESULTS / record["scores_file"])
    return record, scores


def test_detection_scores_cover_every_row(detection):
    record, scores = detection
    assert scores.num_rows == record["n_pos"] + record["n_neg"]
    assert set(record["results"]) <= set(scores.column_names)
    assert (RESULTS / record["scores_file"]).stat().st_size < 2_000_000  # small enough to ship


def test_eval_detect_regenerates_the_detection_table(detection, tmp_path):
    record, _ = detection
    out = tmp_path / "eval"
    assert main(["eval", "detect", "--scores", str(RESULTS / record["scores_file"]), "--labels", str(LABELS),
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "detection.json").read_text())
    assert set(report["detectors"]) == set(record["results"])
    for name, want in record["results"].items():
        _same_metrics(report["detectors"][name]["all"], want)


def test_eval_detect_regenerates_the_stable_label_columns(detection, tmp_path):
    record, _ = detection
    rates = Path(__file__).resolve().parents[1] / record["confident_subset"]["source"]
    out = tmp_path / "eval"
    assert main(["eval", "detect", "--scores", str(RESULTS / record["scores_file"]), "--labels", str(rates),
                 "--rate-column", "replication_rate", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "detection.json").read_text())
    for name, want in record["results"].items():
        _same_metrics(report["detectors"][name]["all"], want["confident"])


def test_within_family_and_by_kind_columns_regenerate(detection):
    record, scores = detection
    labels = _labels_by_caption()
    rows = [labels[t] for t in scores.column("text").to_pylist()]
    y = np.array([r["memorized"] for r in rows])
    family = np.array([r["family"] for r in rows])
    kind = np.array([r["kind"] for r in rows])
    for name, want in record["results"].items():
        s = scores.column(name).to_numpy()
        for f, auroc in want["within_family"].items():
            assert detection_metrics(y[family == f], s[family == f])["auroc"] == pytest.approx(auroc, abs=1e-12)
        for k, auroc in want["by_kind_of_positive"].items():
            sel = (~y) | (kind == k)
            assert detection_metrics(y[sel], s[sel])["auroc"] == pytest.approx(auroc, abs=1e-12)


@pytest.mark.parametrize(("results", "zoo_labels"), [("extraction_collapse.json", LABELS),
                                                    ("extraction_sd.json", SD_LABELS)])
def test_extraction_table_regenerates_from_its_scores(results, zoo_labels):
    record = json.loads((RESULTS / results).read_text())["attacks"]
    if not record.get("scores_file"):
        pytest.skip(f"{results} predates per-prompt scores")
    scores = pq.read_table(RESULTS / record["scores_file"])
    labels = _labels_by_caption(zoo_labels)
    y = np.array([labels[t]["memorized"] for t in scores.column("text").to_pylist()])
    assert scores.num_rows == record["n_prompts"] and int(y.sum()) == record["n_memorized"]
    for name, want in record["attacks"].items():
        s = scores.column(name).to_numpy()
        flagged = np.array(scores.column(f"flagged_{name}").to_pylist(), dtype=bool)
        assert detection_metrics(y, s)["auroc"] == pytest.approx(want["auroc"], abs=1e-12)
        assert int(flagged.sum()) == want["flagged"]
        assert int((flagged & y).sum()) / max(int(flagged.sum()), 1) == pytest.approx(want["precision"], abs=1e-12)
        if "extracted" in want:
            extracted = np.array(scores.column(f"flagged_{name}_extracted").to_pylist(), dtype=bool)
            e = want["extracted"]
            assert int(extracted.sum()) == e["matching_verbatim"] + e["template_verbatim"] + e.get("unattributed", 0)
            assert int((extracted & y).sum()) / max(int(extracted.sum()), 1) == pytest.approx(e["precision"], abs=1e-12)
            assert int((extracted & y).sum()) / int(y.sum()) == pytest.approx(e["recall"], abs=1e-12)
            # each caption family's own threshold: no single-object caption counts below 0.993
            sim = scores.column(f"{name} match similarity").to_numpy()
            thresholds = e["thresholds_by_family"]
            fam = [labels[t]["family"] for t in scores.column("text").to_pylist()]
            assert all(not x or s_ > thresholds[f] for x, s_, f in zip(extracted, sim, fam))


def test_cli_uses_the_library_zoo_prompt_builders():
    from diffmem.cli import scan_commands
    from diffmem.zoo import prompts

    # one definition, in the library (benchmarks and the CLI share it; no copy to drift)
    assert scan_commands.zoo_prompts is prompts.zoo_prompts
    assert scan_commands.zoo_reference_prompts is prompts.zoo_reference_prompts
    from diffmem.zoo.paths import zoo_dir

    collapse = zoo_dir("collapse")
    ref = set(prompts.zoo_reference_prompts(folder=collapse))
    a = prompts.zoo_prompts(1000, exclude=ref, folder=collapse)
    assert len(a) == 1422  # the detection benchmark's prompt set: 308 memorized + 1,114 not
    assert sum(a.columns["memorized"]) == 308 and not ref & set(a.texts)


def _tables_module():
    import importlib.util

    path = RESULTS.parent / "tables.py"
    spec = importlib.util.spec_from_file_location("benchmark_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quoted() -> list[tuple[str, bool, str]]:
    """(table, compact, page) for every table a page quotes: ``tables.PAGES``, the one list ``update-docs`` uses."""
    return [(table, compact, page) for page, blocks in _tables_module().PAGES.items()
            for _, table, compact in blocks]


def test_every_page_quotes_its_tables_and_the_readme_quotes_one():
    quoted = _quoted()
    assert [t for t, _, page in quoted if page == "README.md"] == ["headline"]
    assert {t for t, _, _ in quoted} >= {"headline", "detection-heldout-sd", "bench-heldout-sd", "zoo-gates-current"}


@pytest.mark.parametrize("table, compact, page", _quoted())
def test_docs_quote_each_table_verbatim_from_its_results_file(table, compact, page):
    """Every row rendered from the results file appears, character for character, in the page quoting it."""
    text = (RESULTS.parents[1] / page).read_text()
    missing = [row for row in _tables_module().render(table, compact) if row not in text]
    assert not missing, f"{page} does not quote these rows of {table} (regenerate with benchmarks/tables.py): {missing}"


def test_a_changed_figure_is_caught():
    """The check above has teeth: a row whose figure differs from the file is reported missing."""
    rows = _tables_module().render("bench", compact=True)
    text = "\n".join(rows).replace(rows[-1], rows[-1].replace("0.", "9.", 1))
    assert [r for r in rows if r not in text] == [rows[-1]]


def test_zoo_gate_table_puts_the_labellers_null_beside_each_upper_bound_gate():
    """A gates file that carries the labeller's null (``sd_gates(..., null_rate=...)``) gets one row per upper
    bound: flagged count, the count a pure generaliser would get, and its chance of failing the gate; a column
    from an older file without it shows '-'."""
    from diffmem.zoo.sd_gates import null_exceedance

    null = null_exceedance(2, 147, 0.01, 0.01)
    new = {"gates": {"ordinary_captions": {"value": 0.0136, "target": "<= 0.01", "pass": False, "null": null}}}
    old = {"gates": {"ordinary_captions": {"value": 0.0, "target": "<= 0.01", "pass": True}}}
    rows = _tables_module().zoo_gate_rows([("new", new), ("old", old)])
    assert "| ordinary captions memorized | <= 0.01 | 0.014 (FAIL) | 0.000 (pass) |" in rows
    null_rows = [r for r in rows if "the labeller's null alone" in r]
    assert null_rows == ["| ordinary captions memorized: flagged / expected from the labeller's null alone (of n); "
                         "the chance the null alone fails the gate; the chance it flags as many or more | - | "
                         "2 / 1.47 of 147; 0.433; 0.433 | - |"]
