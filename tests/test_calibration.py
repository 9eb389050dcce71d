"""Calibration that means what it says: records its settings, refuses other models, and a combined flag
whose false-positive rate holds overall (issue #15)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.calibration import (
    Calibration,
    check_attainable,
    check_fpr,
    combined_p,
    detector_threshold,
    flag,
    min_p,
    upper_tail_p,
)
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


def _held_out_fpr(n: int, fpr: float, repeats: int, seed: int = 0, held_out: int = 200) -> tuple[float, float]:
    """Mean held-out false-positive rate of the combined and of one per-detector flag, over ``repeats``
    calibration sets of ``n`` ordinary prompts (3 detectors, two of them correlated), each judged on
    ``held_out`` fresh ordinary prompts drawn the same way."""
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c"]

    def draw(m: int) -> dict[str, np.ndarray]:
        shared = rng.normal(size=m)
        return {"a": rng.normal(size=m), "b": shared + 0.5 * rng.normal(size=m),
                "c": shared + 0.5 * rng.normal(size=m)}

    combined, single = [], []
    for _ in range(repeats):
        cal = Calibration(draw(n), {})
        table, _ = flag(_table(draw(held_out)), cal, names, fpr)
        combined.append(np.mean(table.column("flagged").to_pylist()))
        single.append(np.mean(table.column("flagged_a").to_pylist()))
    return float(np.mean(combined)), float(np.mean(single))


@pytest.mark.parametrize(("n", "fpr"), [(99, 0.01), (74, 0.02), (39, 0.05), (1000, 0.01)])
def test_flags_hold_the_stated_fpr_on_held_out_prompts_at_any_n(n, fpr):
    """The guarantee the scan states: on fresh ordinary prompts, FPR <= the stated one, small n included.
    (The earlier rule, which ranked a calibration prompt against itself, measured 0.031-0.039 at n = 74 and a
    stated 0.01: 3x over.) 400 calibration sets x 200 held-out prompts; the bound allows 3 standard errors
    of the Monte Carlo mean and the flags must use most of the stated rate (not a vacuous 0)."""
    repeats, held_out = (400, 200) if n < 1000 else (40, 2000)
    combined, single = _held_out_fpr(n, fpr, repeats, held_out=held_out)
    se = np.sqrt(fpr / repeats / min(n, held_out)) + np.sqrt(fpr / (repeats * held_out))
    assert combined <= fpr + 3 * se
    assert single <= fpr + 3 * se
    exact = np.floor(fpr * (n + 1) + 1e-9) / (n + 1)  # what one detector's conformal rule gives exactly
    assert single == pytest.approx(exact, abs=3 * se)
    assert combined >= 0.7 * exact  # min-p ties cost little power


def test_combined_p_by_hand():
    cal = Calibration({"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([4.0, 3.0, 2.0, 1.0])}, {})
    # new (5, 0): K = min(1 + 0, 1 + 4) = 1; calibration m_i = min(#{a >= a_i} + [5 >= a_i], #{b >= b_i} + 0)
    # = min([5, 4, 3, 2], [1, 2, 3, 4]) = [1, 2, 3, 2]: one m_i <= 1 -> p = (1 + 1) / 5
    # new (5, 5): m_i = min([5, 4, 3, 2], [2, 3, 4, 5]) = [2, 3, 3, 2]: none <= 1 -> p = 1 / 5
    # new (0, 0): K = 5, every m_i <= 5 -> p = 1
    p = combined_p(cal, ["a", "b"], {"a": np.array([5.0, 5.0, 0.0]), "b": np.array([0.0, 5.0, 0.0])})
    assert p.tolist() == pytest.approx([0.4, 0.2, 1.0])
    assert min_p(cal, ["a", "b"], {"a": np.array([5.0]), "b": np.array([0.0])}).tolist() == [0.2]


def test_one_detector_combined_p_is_its_conformal_p():
    rng = np.random.default_rng(3)
    cal = Calibration({"a": np.round(rng.normal(size=50), 1)}, {})  # rounded: ties included
    s = np.round(rng.normal(size=300) * 1.5, 1)
    assert combined_p(cal, ["a"], {"a": s}) == pytest.approx(upper_tail_p(cal.scores["a"], s))


def test_detector_threshold_is_the_conformal_cut():
    c = np.arange(1.0, 20.0)  # n = 19: FPR 0.1 -> floor(2) - 1 = 1 -> the 2nd largest, 18
    assert detector_threshold(c, 0.1) == 18.0
    assert upper_tail_p(c, np.array([18.5]))[0] == pytest.approx(0.1)  # just above it: p = 2/20
    assert upper_tail_p(c, np.array([18.0]))[0] > 0.1
    assert detector_threshold(c, 0.04) == float("inf")  # 1/20 > 0.04: nothing can be flagged


def test_too_few_calibration_prompts_for_the_fpr_is_refused():
    cal = Calibration({"a": np.arange(74.0)}, {}, path="cal.json")
    with pytest.raises(DiffmemError, match=r"holds 74 ordinary prompts.*at least 99 ordinary prompts"):
        check_attainable(cal, ["a"], 0.01)
    assert check_attainable(cal, ["a"], 0.02) == 74  # 1/75 <= 0.02


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
    # the calibration prompts scanned again: each counts itself, so p >= 2/11 > 0.2 needs #{c >= s} <= 1
    p = np.array(table.column("p_combined").to_pylist())
    assert (np.array(table.column("flagged").to_pylist()) == (p <= 0.2)).all()
    assert {"flagged_noise-norm", "flagged_anisotropy", "min_p", "p_combined"} <= set(table.column_names)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["flagging"]["combined_rule"] == "min-p" and prov["flagging"]["fpr"] == 0.2
    from diffmem.report import build_report

    page = build_report([out], tmp_path / "r.html", gallery_size=0).read_text()
    n = sum(table.column("flagged").to_pylist())
    assert f"{n} prompt(s) flagged at the calibrated false-positive rate 0.2 overall" in page


def test_calibration_of_another_model_or_other_settings_is_refused(calibration, tiny_sd_v_folder, tiny_sd_folder,
                                                                   tmp_path, capsys, caplog):
    cal, prompts = calibration
    base = ["scan", "--prompts", str(prompts), "--detector", "noise-norm", "--calibration", str(cal), "--fpr", "0.2",
            "--quiet"]
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


def test_scan_refuses_an_fpr_its_calibration_cannot_reach_before_scanning(calibration, tiny_sd_folder, tmp_path,
                                                                           capsys):
    cal, prompts = calibration
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--detector", "noise-norm",
                 "--draws", "1", "--calibration", str(cal), "--fpr", "0.05", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds 10 ordinary prompts" in err and "at least 19 ordinary prompts" in err
    assert not (out / "scores.parquet").exists()
