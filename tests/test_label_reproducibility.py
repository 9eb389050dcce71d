"""benchmarks/label_reproducibility.py: a relabelled zoo compared with its reference, row by row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_script import load_benchmark


def _module():
    return load_benchmark("label_reproducibility")


def _zoo(folder: Path, rows: list[dict], summary: dict) -> Path:
    folder.mkdir()
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "zoo.json").write_text(json.dumps({"labels": summary}))
    return folder


def _row(caption: str, ssim: float, memorized: bool) -> dict:
    return {"caption": caption, "ssim_nn": ssim, "memorized": memorized, "match": memorized,
            "memorized_seeds": [0] if memorized else [], "nn_item_id": 3}


def test_round_off_differences_are_counted_and_decisions_compared(tmp_path):
    ref = _zoo(tmp_path / "ref", [_row("a", 0.5, False), _row("b", 0.9, True)], {"n": 2})
    same_decisions = _zoo(tmp_path / "new", [_row("a", 0.5001, False), _row("b", 0.9, True)], {"n": 2, "seconds": 7})
    record = _module().compare(same_decisions, ref)
    assert (record["rows"], record["rows_differing"]) == (2, 1)
    assert record["rows_differing_by_field"] == {"ssim_nn": 1}
    assert record["largest_difference_by_field"]["ssim_nn"] == pytest.approx(1e-4)
    assert record["decisions_identical"] and record["summary_identical"] and record["relabel_seconds"] == 7
    flipped = _zoo(tmp_path / "flip", [_row("a", 0.8, True), _row("b", 0.9, True)], {"n": 3})
    record = _module().compare(flipped, ref)
    assert not record["decisions_identical"] and not record["summary_identical"]
    assert record["rows_differing_by_field"] == {"ssim_nn": 1, "memorized": 1, "match": 1, "memorized_seeds": 1}


def test_other_captions_are_refused(tmp_path):
    ref = _zoo(tmp_path / "ref", [_row("a", 0.5, False)], {})
    other = _zoo(tmp_path / "other", [_row("z", 0.5, False)], {})
    with pytest.raises(SystemExit, match="expected the same captions"):
        _module().compare(other, ref)
