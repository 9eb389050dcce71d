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
