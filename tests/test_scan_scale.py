"""Scans at scale: truncation is summarised once (count on the terminal, list in provenance), not per prompt."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq

from diffmem.detectors import make_detector
from diffmem.models import load_model
from diffmem.prompts import prompts_from_list
from diffmem.scan import ScanSettings, run_scan

SHORT = [f"a {c} circle on a gray background" for c in ("red", "blue", "green")]
LONG = " ".join(["red square"] * 50)  # 100 words: 102 tokens with start and end


def test_truncation_is_one_line_and_listed_in_provenance(tiny_sd_folder, tmp_path, caplog):
    model = load_model(tiny_sd_folder)
    assert model.token_counts([LONG, SHORT[0]]) == [102, 9]  # 7 words + start and end
    prompts = prompts_from_list(SHORT[:2] + [LONG, LONG + " again"] + SHORT[2:])
    with caplog.at_level(logging.WARNING):
        path = run_scan(model, prompts, [make_detector("noise-norm")], tmp_path / "scan",
                        ScanSettings(n_draws=1, batch_size=2), progress=False)
    lines = [r.getMessage() for r in caplog.records if "token" in r.getMessage()]
    assert lines == [f"2 of 5 prompts have more than the tokenizer's 77 tokens and are scored truncated "
                     f"(listed in {tmp_path / 'scan' / 'provenance.json'})"]
    truncated = json.loads((tmp_path / "scan" / "provenance.json").read_text())["prompts"]["truncated"]
    assert truncated == {"max_tokens": 77, "count": 2,
                         "listed": [{"id": prompts.ids[2], "tokens": 102}, {"id": prompts.ids[3], "tokens": 103}]}
    assert pq.read_table(path).num_rows == 5


def test_a_rerun_with_truncated_prompts_resumes(tiny_sd_folder, tmp_path):
    """The truncation record is part of provenance, so it must be identical on a rerun (else resume is refused)."""
    model = load_model(tiny_sd_folder)
    prompts = prompts_from_list([LONG, *SHORT])
    settings = ScanSettings(n_draws=1, batch_size=2)
    first = pq.read_table(run_scan(model, prompts, [make_detector("noise-norm")], tmp_path, settings, progress=False))
    again = pq.read_table(run_scan(model, prompts, [make_detector("noise-norm")], tmp_path, settings, progress=False))
    assert again.equals(first)


def test_token_counts_come_from_each_shard_and_land_in_the_table(tiny_sd_folder, tmp_path):
    """Two ranks each count their own prompts' tokens (no pass over the whole list before the scan); the
    merged table has every prompt's count and provenance the truncation summary."""
    model = load_model(tiny_sd_folder)
    prompts = prompts_from_list([LONG, *SHORT, LONG + " again"])
    settings = ScanSettings(n_draws=1, batch_size=2)
    out = tmp_path / "scan"
    for rank in (0, 1):  # rank 0 first: its merge waits for rank 1's parts
        assert run_scan(model, prompts, [make_detector("noise-norm")], out, settings, rank=rank, world_size=2,
                        progress=False) is None
    assert "truncated" not in json.loads((out / "provenance.json").read_text())["prompts"]  # not known yet
    rank1 = pq.read_table(sorted((out / "parts").glob("rank001-*.parquet"))[0])
    assert rank1.column("position").to_pylist() == [1, 3] and rank1.column("tokens").to_pylist() == [9, 9]
    path = run_scan(model, prompts, [make_detector("noise-norm")], out, settings, rank=0, world_size=2, progress=False)
    assert pq.read_table(path).column("tokens").to_pylist() == [102, 9, 9, 9, 103]
    truncated = json.loads((out / "provenance.json").read_text())["prompts"]["truncated"]
    assert truncated["count"] == 2 and [e["tokens"] for e in truncated["listed"]] == [102, 103]


def test_parts_without_token_counts_are_recounted_at_the_merge(tiny_sd_folder, tmp_path):
    """A folder whose parts were written before the ``tokens`` column existed still gets its truncation record."""
    from diffmem.jobs import write_parquet

    model = load_model(tiny_sd_folder)
    prompts = prompts_from_list([LONG, *SHORT])
    settings = ScanSettings(n_draws=1, batch_size=2)
    out = tmp_path / "scan"
    run_scan(model, prompts, [make_detector("noise-norm")], out, settings, progress=False)
    for part in (out / "parts").glob("*.parquet"):  # as an older version wrote them
        write_parquet(pq.read_table(part).drop_columns(["tokens"]), part)
    (out / "scores.parquet").unlink()
    path = run_scan(model, prompts, [make_detector("noise-norm")], out, settings, progress=False)
    assert "tokens" not in pq.read_table(path).column_names
    assert json.loads((out / "provenance.json").read_text())["prompts"]["truncated"]["count"] == 1
