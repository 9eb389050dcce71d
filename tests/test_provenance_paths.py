"""Shipped results hold no machine paths, and the helper that makes paths portable does what it says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from benchmark_script import load_benchmark

from diffmem.provenance import REPO_ROOT, display_name, is_machine_path, machine_paths, portable, portable_path

RESULTS = REPO_ROOT / "benchmarks" / "results"
# a machine path anywhere in a string value (also inside a command line), not only at its start
EMBEDDED = re.compile(r"(?<![\w.])(/work/|/tmp/|/root/|/home/|/Users/|/mnt/|/data/|/scratch/|[A-Za-z]:\\\\)")


def _result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())


def _records(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def test_no_results_file_holds_an_absolute_path():
    files = _result_files()
    assert len(files) >= 80  # the shipped results are all read
    found = {str(p.relative_to(REPO_ROOT)): hits for p in files
             if (hits := [h for r in _records(p) for h in machine_paths(r)])}
    assert found == {}
    embedded = [str(p.relative_to(REPO_ROOT)) for p in files if EMBEDDED.search(p.read_text())]
    assert embedded == []


def test_shipped_model_sources_are_repository_relative():
    record = json.loads((RESULTS / "bench.json").read_text())
    assert record["model"]["source"] == "diffmem/zoo/checkpoint/pipeline"
    assert record["model"]["fingerprint"] == "891cd26f0698643d"
    assert (REPO_ROOT / record["model"]["source"] / "model_index.json").is_file()


@pytest.mark.parametrize(("value", "expected"), [
    ("/work/x/diffmem/zoo", True), ("~/models/sd", True), ("C:\\models\\sd", True), ("/", False),
    ("CompVis/stable-diffusion-v1-4", False), ("diffmem/zoo/checkpoint", False), ("a / b", False), (3, False),
])
def test_is_machine_path(value, expected):
    assert is_machine_path(value) is expected


def test_portable_path_and_record(tmp_path):
    pipeline = REPO_ROOT / "diffmem" / "zoo" / "checkpoint_sd" / "pipeline"
    assert portable_path(pipeline) == "diffmem/zoo/checkpoint_sd/pipeline"
    assert portable_path("/data/models/sd-v1-5") == "sd-v1-5"  # outside the repository: the folder's name
    assert portable_path("/old/checkout/runs/x", root="/old/checkout") == "runs/x"
    assert portable_path("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert display_name("/srv/m/my-model/") == "my-model" and display_name("C:\\m\\sd.safetensors") == "sd.safetensors"
    record = {"model": {"source": str(tmp_path / "m"), "fingerprint": "ab" * 8},
              "runs": [REPO_ROOT / "benchmarks" / "results", "ok text"], "n": 3}
    assert portable(record) == {"model": {"source": "m", "fingerprint": "ab" * 8},
                                "runs": ["benchmarks/results", "ok text"], "n": 3}


def test_scrub_rewrites_only_the_path_fields(tmp_path):
    scrub = load_benchmark("scrub_paths")
    text = ('{\n  "model": {"source": "/old/co/diffmem/zoo/checkpoint/pipeline", "fingerprint": "f"},\n'
            '  "x": 0.30000000000000004,\n  "out": "/tmp/run.json"\n}\n')
    (tmp_path / "r.json").write_text(text)
    (tmp_path / "r.jsonl").write_text('{"labels": "/elsewhere/runs/a/labels.jsonl"}\n')
    assert scrub.main(["--results", str(tmp_path), "--check"]) == 1
    assert scrub.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "r.json").read_text() == text.replace("/old/co/", "").replace("/tmp/", "")
    assert (tmp_path / "r.jsonl").read_text() == '{"labels": "runs/a/labels.jsonl"}\n'
    assert scrub.main(["--results", str(tmp_path), "--check"]) == 0
