"""``mitigate embedding-noise`` writes a mitigation.json that scan, extract and sample re-apply (#15)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.cli.main import main

PROMPTS = ["a photo of a cat", "a dog", "a red house"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd_folder):
    root = tmp_path_factory.mktemp("mitfile")
    prompts = root / "p.txt"
    prompts.write_text("\n".join(PROMPTS), encoding="utf-8")
    out = root / "noise"
    assert main(["mitigate", "embedding-noise", "--model", str(tiny_sd_folder), "--prompts", str(prompts),
                 "--reference", str(prompts), "--option", "scale=2.0", "--out", str(out), "--quiet"]) == 0
    return prompts, out / "mitigation.json"


def test_mitigation_file_says_how_to_use_it(files):
    record = json.loads(files[1].read_text())
    assert record["mitigator"] == {"name": "embedding-noise", "scale": 2.0, "seed": 0}
    assert "--mitigation" in record["use"] and record["acts_at"] == "inference"


def test_mitigate_says_how_to_apply_the_file(files, tiny_sd_folder, tmp_path, capsys):
    prompts, _ = files
    assert main(["mitigate", "embedding-noise", "--model", str(tiny_sd_folder), "--prompts", str(prompts),
                 "--reference", str(prompts), "--out", str(tmp_path / "n"), "--quiet"]) == 0
    assert f"--mitigation {tmp_path / 'n' / 'mitigation.json'}" in capsys.readouterr().out


def test_scan_with_mitigation_scores_the_mitigated_model(files, tiny_sd_folder, tmp_path):
    prompts, mitigation = files
    base = ["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--detector", "noise-norm",
            "--draws", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--mitigation", str(mitigation), "--out", str(tmp_path / "mitigated")]) == 0
    plain = pq.read_table(tmp_path / "plain" / "scores.parquet").column("noise-norm").to_numpy()
    mitigated = pq.read_table(tmp_path / "mitigated" / "scores.parquet").column("noise-norm").to_numpy()
    assert np.all(np.abs(plain - mitigated) > 1e-6)  # every prompt's conditioning was perturbed
    prov = json.loads((tmp_path / "mitigated" / "provenance.json").read_text())
    plain_prov = json.loads((tmp_path / "plain" / "provenance.json").read_text())
    assert prov["model"]["fingerprint"] != plain_prov["model"]["fingerprint"]  # never mixed on resume
    assert "embedding-noise" in prov["model"]["source"]
    # resuming the mitigated folder without the mitigation is refused
    assert main([*base, "--out", str(tmp_path / "mitigated")]) == 2


def test_sample_with_mitigation_changes_the_images(files, tiny_sd_folder, tmp_path):
    prompts, mitigation = files
    base = ["sample", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--steps", "2", "--limit", "2",
            "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--mitigation", str(mitigation), "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert rec["mitigation"]["name"] == "embedding-noise" and len(rec["images"]) == 2
    a = [np.asarray(Image.open(tmp_path / "a" / r["file"]), dtype=float) for r in rec["images"]]
    b = [np.asarray(Image.open(tmp_path / "b" / r["file"]), dtype=float) for r in rec["images"]]
    assert all(x.shape == y.shape and np.abs(x - y).mean() > 0.5 for x, y in zip(a, b))


def test_a_patched_checkpoint_is_not_a_mitigation_file(tmp_path, tiny_sd_folder, capsys):
    bad = tmp_path / "mitigation.json"
    bad.write_text(json.dumps({"mitigator": {"name": "subspace-pruning"}, "acts_at": "weights"}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--mitigation", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert "load the patched folder with --model" in capsys.readouterr().err
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--mitigation",
                 str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
