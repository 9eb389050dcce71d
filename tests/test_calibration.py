"""Calibration that means what it says: records its settings, refuses other models, and a combined flag
whose false-positive rate holds overall (issue #15)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.calibration import Calibration, check_fpr, combined_cutoff, flag, min_p, upper_tail_p
from diffmem.cli.main import main
from diffmem.errors import DiffmemError

ORDINARY = ["a dog", "a house", "a tree by a lake", "a small green square", "a boat", "a red car", "two birds",
            "a blue chair", "a mountain", "a city street"]


def test_upper_tail_p_by_hand():
    cal = np.array([1.0, 2.0, 3.0, np.nan])  # NaN calibration scores are ignored: n = 3
    p = upper_tail_p(cal, np.array([2.5, 0.0, 5.0, 2.0, np.nan]))
    # (1 + #{c >= s}) / (n + 1): 2.5 -> (1+1)/4, 0 -> (1+3)/4, 5 -> 1/4, 2 -> (1+2)/4, NaN -> 1
    assert p.tolist() == [0.5, 1.0, 0.25, 0.75, 1.0]


def test_fpr_must_be_strictly_between_0_and_1():
    for bad in (0, 0.0, 1, -0.1, 1.5):
        with pytest.raises(DiffmemError, match="--fpr must be between 0 and 1"):
            check_fpr(bad)
    assert check_fpr(0.01) == 0.01


def _table(scores: dict[str, np.ndarray]) -> pa.Table:
    n = len(next(iter(scores.values())))
    return pa.table({"id": [str(i) for i in range(n)], "text": [f"p{i}" for i in range(n)],
                     **{k: pa.array(v, pa.float64()) for k, v in scores.items()}})


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1])
def test_combined_flag_holds_the_stated_fpr_on_the_calibration_set(fpr):
    rng = np.random.default_rng(0)
    n, names = 400, ["a", "b", "c"]
    shared = rng.normal(size=n)
    scores = {"a": rng.normal(size=n), "b": rng.normal(size=n), "c": 0.5 * shared + rng.normal(size=n)}
    cal = Calibration(scores, {})
    table, flagging = flag(_table(scores), cal, names, fpr)
    combined = np.array(table.column("flagged").to_pylist())
    per = np.stack([np.array(table.column(f"flagged_{d}").to_pylist()) for d in names])
    assert combined.mean() <= fpr  # the min-p combination, calibrated as a whole
    assert combined.mean() >= 0.75 * fpr  # and not needlessly conservative (ties of min-p only)
    assert per.any(axis=0).mean() > 1.8 * fpr  # the OR of per-detector flags would not hold it
    for row in per:
        assert row.mean() <= fpr  # each per-detector flag holds it for its own detector
    assert flagging.combined_rule == "min-p" and flagging.fpr == fpr


def test_combined_cutoff_by_hand():
    cal = Calibration({"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([4.0, 3.0, 2.0, 1.0])}, {})
    # p_a = [1, .8, .6, .4], p_b = [.4, .6, .8, 1] -> m = [.4, .6, .6, .4]; fpr .25: floor(1) = 1 below t
    assert min_p(cal, ["a", "b"], cal.scores).tolist() == pytest.approx([0.4, 0.6, 0.6, 0.4])
    assert combined_cutoff(cal, ["a", "b"], 0.25) == pytest.approx(0.4)  # m < 0.4: none (ties kept out)
    assert combined_cutoff(cal, ["a", "b"], 0.5) == pytest.approx(0.6)  # m < 0.6: the two 0.4s


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, tiny_sd_folder):
    root = tmp_path_factory.mktemp("cal")
    prompts = root / "ordinary.txt"
    prompts.write_text("\n".join(ORDINARY), encoding="utf-8")
    out = root / "calibration"
    assert main(["calibrate", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--detector", "noise-norm",
                 "--detector", "anisotropy", "--draws", "1", "--out", str(out), "--quiet"]) == 0
    return out / "calibration.json", prompts


def test_calibration_records_model_detectors_and_draws(calibration, tiny_sd_folder):
    from diffmem.models import load_model

    record = json.loads(calibration[0].read_text())
    assert record["model_fingerprint"] == load_model(tiny_sd_folder).fingerprint
    assert [d["name"] for d in record["detectors"]] == ["noise-norm", "anisotropy"]
    assert record["settings"] == {"n_draws": 1, "seed": 0, "schedule_steps": 50, "seed_per_prompt": False}
    assert record["noise_seeds"] == [0] and len(record["scores"]["noise-norm"]) == len(ORDINARY)


def test_scan_flags_per_detector_and_combined_and_says_how(calibration, tiny_sd_folder, tmp_path, capsys):
    cal, prompts = calibration
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--detector", "noise-norm",
                 "--detector", "anisotropy", "--draws", "1", "--calibration", str(cal), "--fpr", "0.2",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "flagged at FPR 0.2 overall:" in text and "min-p" in text
    table = pq.read_table(out / "scores.parquet")
    # the calibration prompts themselves: at most floor(0.2 * 10) = 2 flagged by the combination
    assert sum(table.column("flagged").to_pylist()) <= 2
    assert {"flagged_noise-norm", "flagged_anisotropy", "min_p"} <= set(table.column_names)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["flagging"]["combined_rule"] == "min-p" and prov["flagging"]["fpr"] == 0.2
    from diffmem.report import build_report

    page = build_report([out], tmp_path / "r.html", gallery_size=0).read_text()
    n = sum(table.column("flagged").to_pylist())
    assert f"{n} prompt(s) flagged at the calibrated false-positive rate 0.2 overall" in page


def test_calibration_of_another_model_or_other_settings_is_refused(calibration, tiny_sd_v_folder, tiny_sd_folder,
                                                                   tmp_path, capsys, caplog):
    cal, prompts = calibration
    base = ["scan", "--prompts", str(prompts), "--detector", "noise-norm", "--calibration", str(cal), "--quiet"]
    assert main([*base, "--model", str(tiny_sd_v_folder), "--draws", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "was made with other settings: model fingerprint" in err and "--accept-calibration-mismatch" in err
    assert not (tmp_path / "a" / "provenance.json").exists()  # refused before anything was written
    assert main([*base, "--model", str(tiny_sd_folder), "--draws", "2", "--out", str(tmp_path / "b")]) == 2
    assert "draws 2 (calibrated with 1)" in capsys.readouterr().err
    assert main([*base, "--model", str(tiny_sd_v_folder), "--draws", "1", "--out", str(tmp_path / "c"),
                 "--accept-calibration-mismatch"]) == 0
    assert "its FPR does not hold" in caplog.text


def test_seeding_convention_is_a_calibration_setting():
    from diffmem.calibration import calibration_mismatches

    model = {"fingerprint": "abc"}
    shared = {"model": model, "detectors": [], "settings": {"n_draws": 4, "seed": 0, "schedule_steps": 50}}
    cal = Calibration(scores={"noise-norm": np.zeros(3)}, provenance=shared)
    # a calibration written before the setting existed ran with shared draws: same as seed_per_prompt=False
    same = {**shared, "settings": {**shared["settings"], "seed_per_prompt": False}}
    assert calibration_mismatches(cal, same, ["noise-norm"]) == []
    per_prompt = {**shared, "settings": {**shared["settings"], "seed_per_prompt": True}}
    assert calibration_mismatches(cal, per_prompt, ["noise-norm"]) == ["seed_per_prompt True (calibrated with False)"]
