"""The shipped mitigation-bench files regenerated from their shipped per-split-seed records: every ``results`` row
(mean and spread over split seeds) is what :func:`diffmem.bench.summarise` makes of its ``runs`` (earlier key names
read under their current ones, :func:`diffmem.bench_results.upgrade_result`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmem.bench import summarise
from diffmem.bench_results import upgrade_result

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BENCH_FILES = sorted(p.name for p in RESULTS.glob("bench_task*.json"))


@pytest.mark.parametrize("name", BENCH_FILES)
def test_bench_results_are_the_summary_of_its_runs(name):
    record = json.loads((RESULTS / name).read_text())
    if "runs" not in record:
        pytest.skip(f"{name} holds no per-seed runs")
    again = summarise(record["runs"])
    assert set(again) == set(record["results"])
    for method, row in record["results"].items():
        for key, value in upgrade_result(row).items():  # files from before a key's rename, read as bench reads them
            if isinstance(value, float):
                assert again[method][key] == pytest.approx(value, abs=1e-12), (name, method, key)
            else:
                assert again[method][key] == value, (name, method, key)


def test_there_are_bench_files_to_check():
    assert "bench_task_sd.json" in BENCH_FILES
