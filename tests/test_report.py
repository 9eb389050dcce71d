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
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no scan, extraction or JSON results" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package chromium not installed")
def test_report_renders_in_headless_chromium(scan_dir, tmp_path):
    page = build_report([scan_dir], tmp_path / "r.html", gallery_size=0)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Scan: 4 prompts" in dom and "noise-norm" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1100,900", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert len(set(img.resize((64, 64)).getdata())) > 8  # not a blank page: plot and table were painted


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
