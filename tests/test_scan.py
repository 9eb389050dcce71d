"""The scan: resumable, refuses mixed settings, reports NaN and duplicates, shards with accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import diffmem.scan as scan_module
from diffmem.cli.main import main
from diffmem.detectors import make_detector
from diffmem.errors import DiffmemError
from diffmem.models import load_model
from diffmem.prompts import prompts_from_list
from diffmem.scan import ScanSettings, run_scan

PROMPTS = [f"a {c} {s} in the center on a gray background" for c in ("red", "blue", "green", "pink")
           for s in ("circle", "square")] + ["a photo of a cat", "an astronaut"]


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


def _detectors():
    return [make_detector("noise-norm"), make_detector("anisotropy")]


def test_interrupted_scan_resumes_to_the_same_table(model, tmp_path, monkeypatch):
    prompts = prompts_from_list(PROMPTS)
    settings = ScanSettings(n_draws=2, batch_size=3)
    full = pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / "full", settings, progress=False))

    real, calls = scan_module.score_chunk, []

    def dying(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_module, "score_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run_scan(model, prompts, _detectors(), tmp_path / "resumed", settings, progress=False)
    assert len(list((tmp_path / "resumed" / "parts").glob("*.parquet"))) == 2
    assert not (tmp_path / "resumed" / "scores.parquet").exists()
    monkeypatch.setattr(scan_module, "score_chunk", real)
    resumed = pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / "resumed", settings, progress=False))
    assert resumed.column("text").to_pylist() == PROMPTS  # every prompt exactly once, in file order
    for name in ("noise-norm", "anisotropy"):
        np.testing.assert_allclose(resumed.column(name).to_numpy(), full.column(name).to_numpy(), rtol=1e-6)
    prov = json.loads((tmp_path / "resumed" / "provenance.json").read_text())
    assert prov["model"]["fingerprint"] == model.fingerprint and prov["noise_seeds"] == [0, 1]
    assert [d["name"] for d in prov["detectors"]] == ["noise-norm", "anisotropy"]


def test_scores_do_not_depend_on_batch_size(model, tmp_path):
    prompts = prompts_from_list(PROMPTS)
    a = pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / "a", ScanSettings(2, batch_size=10),
                               progress=False))
    b = pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / "b", ScanSettings(2, batch_size=4),
                               progress=False))
    np.testing.assert_allclose(a.column("noise-norm").to_numpy(), b.column("noise-norm").to_numpy(), rtol=1e-5)


def test_seed_per_prompt_scan_does_not_depend_on_batch_size_and_is_recorded(model, tmp_path):
    prompts = prompts_from_list(PROMPTS)
    per_prompt = [pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / f"p{b}",
                                         ScanSettings(2, batch_size=b, seed_per_prompt=True), progress=False))
                  for b in (10, 3)]
    for name in ("noise-norm", "anisotropy"):
        np.testing.assert_allclose(per_prompt[0].column(name).to_numpy(), per_prompt[1].column(name).to_numpy(),
                                   rtol=1e-5)
    shared = pq.read_table(run_scan(model, prompts, _detectors(), tmp_path / "shared", ScanSettings(2, batch_size=10),
                                    progress=False))
    assert not np.allclose(shared.column("noise-norm").to_numpy(), per_prompt[0].column("noise-norm").to_numpy())
    prov = json.loads((tmp_path / "p3" / "provenance.json").read_text())
    assert prov["settings"]["seed_per_prompt"] is True and "per prompt" in prov["noise_seeds"]


def test_cli_seed_per_prompt_flag_reaches_the_scan(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3]), encoding="utf-8")
    common = ["scan", "--model", str(tiny_sd_folder), "--draws", "1", "--quiet", "--prompts", str(prompts),
              "--detector", "noise-norm"]
    assert main([*common, "--seed-per-prompt", "--out", str(tmp_path / "per")]) == 0
    assert main([*common, "--out", str(tmp_path / "shared")]) == 0
    per, shared = (json.loads((tmp_path / d / "provenance.json").read_text()) for d in ("per", "shared"))
    assert per["settings"]["seed_per_prompt"] is True and shared["settings"]["seed_per_prompt"] is False
    assert shared["noise_seeds"] == [0]


def test_rerun_with_other_settings_is_refused(model, tmp_path):
    prompts = prompts_from_list(PROMPTS[:3])
    run_scan(model, prompts, _detectors(), tmp_path, ScanSettings(n_draws=2), progress=False)
    with pytest.raises(DiffmemError, match="holds a run with other settings"):
        run_scan(model, prompts, _detectors(), tmp_path, ScanSettings(n_draws=3), progress=False)


def test_nan_scores_are_kept_and_not_ranked(model, tmp_path, capsys):
    prompts = prompts_from_list(PROMPTS[:4])
    poison = model.encode_prompts([PROMPTS[1]])

    def hook(module, args, output):
        hidden = output[0]
        rows = (hidden[:, 1:4] - poison[:, 1:4].to(hidden)).abs().flatten(1).max(1).values < 1e-6
        hidden[rows] = float("nan")
        return output

    handle = model.text_encoder.register_forward_hook(hook)
    try:
        path = run_scan(model, prompts, _detectors(), tmp_path, ScanSettings(n_draws=2), progress=False)
    finally:
        handle.remove()
    table = pq.read_table(path)
    s = table.column("noise-norm").to_numpy()
    assert np.isnan(s[1]) and np.isfinite(np.delete(s, 1)).all()
    from diffmem.cli.scan_commands import print_summary

    print_summary(table, ["noise-norm"], 3)
    assert "1 prompt(s) with NaN scores, not ranked" in capsys.readouterr().out


def test_cli_calibrate_scan_and_evaluate(tiny_sd_folder, tmp_path, capsys):
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("\n".join(PROMPTS[:6]), encoding="utf-8")
    prompts = tmp_path / "prompts.csv"
    rows = ["caption;memorized;type"] + [f"{p};{int(i % 3 == 0)};{'VM' if i % 2 else 'TM'}"
                                          for i, p in enumerate(PROMPTS)] + [f"{PROMPTS[0]};1;VM"]
    prompts.write_text("\n".join(rows), encoding="utf-8")
    common = ["--model", str(tiny_sd_folder), "--draws", "2", "--quiet"]
    assert main(["calibrate", *common, "--prompts", str(ordinary), "--out", str(tmp_path / "cal")]) == 0
    calib = tmp_path / "cal" / "calibration.json"
    assert main(["scan", *common, "--prompts", str(prompts), "--out", str(tmp_path / "scan"),
                 "--calibration", str(calib), "--fpr", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "1 duplicate prompt(s)" in out and "thresholds at FPR 0.2" in out
    table = pq.read_table(tmp_path / "scan" / "scores.parquet")
    assert table.num_rows == len(PROMPTS) and "flagged" in table.column_names
    assert main(["eval", "detect", "--scores", str(tmp_path / "scan" / "scores.parquet"), "--labels", str(prompts),
                 "--split-by", "type", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "detection.json").read_text())
    m = report["detectors"]["noise-norm"]["all"]
    assert m["n_pos"] == 4 and m["n_neg"] == 6
    # AUROC by hand from the scan's own scores: the share of (memorized, ordinary) pairs ordered right, ties half
    s = dict(zip(table.column("text").to_pylist(), table.column("noise-norm").to_pylist()))
    pos = [s[p] for i, p in enumerate(PROMPTS) if i % 3 == 0]
    neg = [s[p] for i, p in enumerate(PROMPTS) if i % 3 != 0]
    by_hand = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert m["auroc"] == pytest.approx(by_hand, abs=1e-12)
    assert {"strict", "closest"} <= set(m["tpr@0.01fpr"])
    assert "type=VM" in report["detectors"]["noise-norm"]
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 5000


def test_eval_detect_with_replication_rates_leaves_ambiguous_prompts_out(tiny_sd_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    assert main(["scan", "--model", str(tiny_sd_folder), "--draws", "1", "--quiet", "--prompts", str(prompts),
                 "--out", str(tmp_path / "scan")]) == 0
    rates = [1.0, 0.0, 0.25, 0.5, 0.0, 0.75, 0.0, 0.0][: len(PROMPTS)] + [0.0] * max(0, len(PROMPTS) - 8)
    labels = tmp_path / "rates.jsonl"
    labels.write_text("\n".join(json.dumps({"caption": p, "rate": r}) for p, r in zip(PROMPTS, rates)))
    args = ["eval", "detect", "--scores", str(tmp_path / "scan" / "scores.parquet"), "--labels", str(labels),
            "--rate-column", "rate", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "detection.json").read_text())
    m = report["detectors"]["noise-norm"]["all"]
    assert report["n_ambiguous_left_out"] == 1 and (m["n_pos"], m["n_neg"]) == (3, len(PROMPTS) - 4)
    assert main(args + ["--positive-rate", "0.8"]) == 0  # 0.5 and 0.75 become ambiguous too
    assert json.loads((tmp_path / "eval" / "detection.json").read_text())["n_ambiguous_left_out"] == 3
    labels.write_text(json.dumps({"caption": PROMPTS[0], "rate": "often"}))
    assert main(args) == 2
    assert "column 'rate' must hold rates in [0, 1], got 'often'" in capsys.readouterr().err


def test_scan_passes_detector_options_and_names_bad_ones(tiny_sd_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3]), encoding="utf-8")
    common = ["scan", "--model", str(tiny_sd_folder), "--draws", "1", "--quiet", "--prompts", str(prompts)]
    assert main(common + ["--detector", "combined", "--option", 'combined.members=["noise-norm","anisotropy"]',
                          "--reference", str(prompts), "--out", str(tmp_path / "a")]) == 0
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert provenance["detectors"][0]["members"] == ["noise-norm", "anisotropy"]
    bad = ["--detector", "noise-norm", "--option", "noise-norm.draws=3", "--out", str(tmp_path / "b")]
    assert main(common + bad) == 2
    assert "detector 'noise-norm'" in capsys.readouterr().err
    assert main(common + ["--option", "sharpness.samples=2", "--out", str(tmp_path / "c")]) == 2
    assert "DETECTOR.KEY=VALUE" in capsys.readouterr().err


def test_fpr_without_calibration_is_an_error(tiny_sd_folder, tmp_path, capsys):
    assert main(["scan", "--model", str(tiny_sd_folder), "--fpr", "0.01", "--out", str(tmp_path)]) == 2
    assert "--fpr needs --calibration" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_merge_into_the_single_process_table(tiny_sd_folder, tmp_path):
    """Two CPU processes (torchrun, the launcher under ``accelerate launch --multi_gpu``) shard and merge."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    args = ["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--draws", "2", "--batch-size", "2",
            "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    subprocess.run([*launch, "-m", "diffmem.cli", *args, "--out", str(tmp_path / "two")], check=True, env=env,
                   capture_output=True, timeout=300)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = pq.read_table(tmp_path / "one" / "scores.parquet")
    two = pq.read_table(tmp_path / "two" / "scores.parquet")
    assert two.column("text").to_pylist() == one.column("text").to_pylist()
    assert len(list((tmp_path / "two" / "parts").glob("rank001-*.parquet"))) > 0
    # the shards are disjoint and together cover every prompt once (rank r scores positions r, r + 2, ...)
    shards = [[p for f in sorted((tmp_path / "two" / "parts").glob(f"rank00{r}-*.parquet"))
               for p in pq.read_table(f).column("position").to_pylist()] for r in (0, 1)]
    assert shards[0] == list(range(0, len(PROMPTS), 2)) and shards[1] == list(range(1, len(PROMPTS), 2))
    assert two.column("id").to_pylist() == one.column("id").to_pylist()
    torch.testing.assert_close(torch.tensor(two.column("noise-norm").to_numpy()),
                               torch.tensor(one.column("noise-norm").to_numpy()), rtol=1e-5, atol=1e-6)
