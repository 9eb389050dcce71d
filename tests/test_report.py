"""The HTML report: self-contained, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from diffmem.cli.main import main
from diffmem.prompts import prompts_from_list
from diffmem.report import build_report
from diffmem.scan import ScanSettings, run_scan

PROMPTS = ["a red circle in the center on a gray background", "a photo of a cat", "a dog", "a tree"]


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory, tiny_sd_folder):
    from diffmem.detectors import make_detector
    from diffmem.models import load_model

    out = tmp_path_factory.mktemp("scan")
    prompts = prompts_from_list(PROMPTS)
    prompts.columns["memorized"] = [True, False, True, False]
    run_scan(load_model(tiny_sd_folder), prompts, [make_detector("noise-norm")], out, ScanSettings(n_draws=2),
             progress=False)
    return out


def test_report_is_self_contained(scan_dir, tmp_path):
    page = build_report([scan_dir], tmp_path / "r.html", gallery_size=0).read_text()
    assert "<table class=\"metrics\">" in page and "AUROC" in page
    assert "data:image/png;base64," in page  # the ROC plot is embedded
    assert not re.search(r"(src|href)=\"https?://", page)  # no CDN, nothing fetched


def test_report_of_nothing_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # the report beside the run folder: inside it is refused (an input)
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no scan, extraction or JSON results" in capsys.readouterr().err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _bench_run(tmp_path):
    """A bench folder whose results have every metric column and long setting values (the widest section)."""
    import json

    run = tmp_path / "bench"
    run.mkdir()
    metrics = {"acts_at": "weights", "extraction_rate": 0.052083, "extraction_rate_std": 0.0104,
               "retrigger_extraction_rate": 0.09375, "retrigger_extraction_rate_std": 0.09375,
               "fidelity_ordinary_all": 0.9453, "fidelity_ordinary_all_std": 0.0234, "fidelity_memorized_all": 0.8229,
               "fidelity_memorized_all_std": 0.03125, "fidelity": 0.9, "fid": 41.2, "parameters_changed": 647168,
               "fit_seconds": 284.2}
    names = ["none", "random-tokens", "adversarial-finetune", "embedding-noise", "prompt-adaptation",
             "subspace-pruning", "nemo"]
    (run / "bench.json").write_text(json.dumps({
        "results": {n: metrics for n in names}, "runs": {"0": {}, "1": {}},
        "model": {"source": "/work/somewhere/very/long/path/to/a/model/folder/pipeline", "fingerprint": "f" * 16},
        "settings": {"note": "x" * 400, "tune": {"adversarial-finetune": {"retain_weight": [30, 100]}}}}))
    return run


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package chromium not installed")
def test_report_renders_in_headless_chromium_and_fits_its_width(scan_dir, tmp_path):
    page = build_report([scan_dir, _bench_run(tmp_path)], tmp_path / "r.html", gallery_size=0)
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Scan: 4 prompts" in dom and "noise-norm" in dom and "Mitigation benchmark" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1100,900", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert len(set(img.resize((64, 64)).getdata())) > 8  # not a blank page: plot and table were painted
    # the page fits a 1100-pixel window: nothing runs off the right edge (measured on a copy that reports it)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>document.body.setAttribute('data-width', document.documentElement.scrollWidth + ',' "
                   "+ document.documentElement.clientWidth)</script></body>"))
    dom = subprocess.run(["chromium", *flags, "--window-size=1100,900", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    scroll, client = map(int, re.search(r'data-width="(\d+),(\d+)"', dom).groups())
    assert client > 900 and scroll <= client


def test_report_tabulates_extraction_by_replication_rate(tmp_path):
    import pyarrow as pa

    from diffmem.jobs import write_parquet

    run = tmp_path / "extract"
    run.mkdir()
    (run / "provenance.json").write_text('{"model": {"fingerprint": "f"}, "attacks": [{"name": "a"}], '
                                        '"matcher": {"name": "ssim", "threshold": 0.7}}')
    write_parquet(pa.table({"id": ["0", "1", "2", "3"], "text": ["p", "q", "r", "s"],
                            "a.score": [0.9, 0.1, 0.8, 0.2], "a.flagged": [True, False, True, False],
                            "input_kind": ["signature", "signature", "signature", "generic"],
                            "input_replication": ["64", "1", "1", "1"],
                            "input_memorized": ["True", "False", "True", "False"]}), run / "extraction.parquet")
    page = build_report([run], tmp_path / "r.html", gallery_size=0).read_text()
    assert "flag rate by replication rate" in page and "1x 0.50" in page and "64x 1.00" in page
    assert "<td>1.000</td>" in page  # precision and recall of the flag against the labels


# ---------------------------------------------------------------- issue #15: what a user sees
def test_report_leads_with_findings_and_next_steps(scan_dir, tmp_path):
    page = build_report([scan_dir], tmp_path / "r.html", gallery_size=0).read_text()
    assert page.index('id="findings"') < page.index("Scan: 4 prompts")
    assert "trust noise-norm: TPR" in page and "on 2 memorized / 2 ordinary labelled prompts" in page
    # the "too few negatives" warning is kept (2 ordinary prompts cannot measure 1% FPR)
    assert "only 2 negatives: FPR 0.01 is below one false positive" in page
    assert "Scan new prompts with `--detector noise-norm`" in page


def test_report_without_labels_says_how_to_get_flags(tmp_path, tiny_sd_folder):
    from diffmem.detectors import make_detector
    from diffmem.models import load_model

    out = tmp_path / "scan"
    run_scan(load_model(tiny_sd_folder), prompts_from_list(PROMPTS[:2]), [make_detector("noise-norm")], out,
             ScanSettings(n_draws=1), progress=False)
    page = build_report([out], tmp_path / "r.html", gallery_size=0).read_text()
    assert "scores only (no labels, no calibration)" in page and "diffmem calibrate --prompts" in page


def test_json_results_are_tables_with_settings_folded_away(tmp_path):
    import json

    run = tmp_path / "eval"
    run.mkdir()
    (run / "detection.json").write_text(json.dumps({"scores": "/srv/private/scan/scores.parquet", "results": {
        "noise-norm": {"auroc": 0.75, "n_pos": 3}, "sharpness": {"auroc": 0.5, "n_pos": 3}}}))
    page = build_report([run], tmp_path / "r.html", gallery_size=0).read_text()
    assert "<pre>" not in page
    assert "<th>results</th><th>auroc</th><th>n_pos</th>" in page
    assert "<tr><td>noise-norm</td><td>0.75</td><td>3</td></tr>" in page
    details = page[page.index("<details"):page.index("</details>")]
    assert '<td class="text">scores</td><td class="text">scores.parquet</td>' in details
    assert "/srv/private" not in page


def test_bench_is_one_method_by_metric_table_with_a_plot(tmp_path):
    import json

    run = tmp_path / "bench"
    run.mkdir()
    results = {"none": {"acts_at": "-", "extraction_rate": 0.75, "extraction_rate_std": 0.05,
                        "retrigger_extraction_rate": 0.5, "fidelity_ordinary_all": 0.93, "parameters_changed": 0},
               "nemo": {"acts_at": "weights", "extraction_rate": 0.125, "extraction_rate_std": 0.0,
                        "retrigger_extraction_rate": 0.25, "fidelity_ordinary_all": 0.9, "parameters_changed": 40}}
    (run / "bench.json").write_text(json.dumps({
        "results": results, "runs": {"0": {}, "1": {}},
        "model": {"source": "/home/someone/models/sd-v1-5", "fingerprint": "ab12"},
        "settings": {"split_seeds": [0, 1], **{f"option_{i}": i for i in range(40)}}}))
    (run / ".diffmem-output.json").write_text(json.dumps({"command": "bench", "files": ["bench.json"]}))
    page = build_report([run], tmp_path / "r.html", gallery_size=0).read_text()
    # an earlier file's one re-trigger (the tuned attack) is read back under its current name
    assert ("<tr><th>method</th><th>acts at</th><th>extraction</th><th>under tuned re-trigger</th>"
            "<th>fidelity, ordinary</th><th>parameters changed</th></tr>") in page
    assert ('<tr><td class="text">nemo</td><td class="text">weights</td><td>0.125</td><td>0.250</td><td>0.900</td>'
            "<td>40</td></tr>") in page
    assert "0.750 ± 0.050" in page and page.count('class="bench-plot"') == 1
    # settings and provenance folded into one details block, paths by name, no marker section
    details = page[page.index("<details"):page.index("</details>")]
    assert "settings.option_39" in details and "sd-v1-5" in details
    assert "settings.option_0" not in page[:page.index("<details")]
    assert "/home/someone" not in page and "diffmem-output" not in page and "settings: command" not in page
    # a current file: DoRI and the tuned re-trigger side by side
    for r, dori in zip(results.values(), (0.875, 0.5)):
        r["tuned_retrigger_extraction_rate"] = r.pop("retrigger_extraction_rate")
        r["dori_extraction_rate"] = dori
    (run / "bench.json").write_text(json.dumps({"results": results, "runs": {"0": {}}}))
    page = build_report([run], tmp_path / "r2.html", gallery_size=0).read_text()
    assert "<th>extraction</th><th>under DoRI</th><th>under tuned re-trigger</th>" in page
    assert "<td>0.125</td><td>0.500</td><td>0.250</td>" in page


def test_gallery_uses_the_callers_source_and_the_best_detector(scan_dir, tmp_path, tiny_sd_folder):
    import torch

    from diffmem.eval.matching import make_matcher
    from diffmem.models import load_model
    from diffmem.zoo.gallery import GalleryContext

    class Index:
        images = torch.rand(3, 3, 16, 16)
        matcher = make_matcher("ssim").fit(images)

    seen = []

    def source(folder):
        seen.append(folder)
        # only the first prompt has a training image; the others get no verdict
        return GalleryContext(load_model(tiny_sd_folder), Index(), lambda t, s: (s > 2.0) if t == PROMPTS[0] else None)

    page = build_report([scan_dir], tmp_path / "r.html", gallery_size=2, gallery=source).read_text()
    assert seen == [scan_dir]
    assert "Top prompts by noise-norm, the best detector of this run" in page
    assert page.count("no training image for this prompt") >= 1
    assert 'class="rep"' not in page  # no red "replicates" verdict where there is no training image


def test_roc_legend_sits_beside_the_axes():
    import numpy as np

    from diffmem.eval.detection import roc_figure

    fig = roc_figure({"a": (np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2]))}, legend_outside=True)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a (AUROC 1.000)"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    axes_box = fig.axes[0].get_window_extent()
    assert box.x0 >= axes_box.x1  # entirely to the right of the curves


def test_report_module_does_not_import_the_cli_or_read_the_zoo():
    import ast
    import inspect

    import diffmem.report as report

    tree = ast.parse(inspect.getsource(report))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith(("diffmem.cli", "diffmem.zoo", "diffmem.tasks")) for m in imported), imported
    assert "zoo_dir" not in inspect.getsource(report)
