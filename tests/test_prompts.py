"""Prompt files: every format users bring, the field's real lists, and bad files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffmem.errors import PromptError
from diffmem.prompts import load_prompts

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"
REAL_FILES = {
    "sdv1_500_memorized.jsonl": 500,
    "nemo_memorized_laion_prompts.csv": None,  # same 500 captions; a few repeat
    "nemo_unmemorized_laion_prompts.csv": None,
    "anisotropy_sd1_nmem.txt": None,
    "anisotropy_sd2_mem.jsonl": None,
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/prompts is not beside this checkout")
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_the_fields_prompt_lists_load_as_they_are(name):
    ps = load_prompts(SHARED / name)
    assert len(ps) + ps.duplicates >= 200
    assert all(isinstance(t, str) and t for t in ps.texts)
    assert len(set(ps.texts)) == len(ps.texts)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/prompts is not beside this checkout")
def test_nemo_csv_keeps_its_label_column():
    ps = load_prompts(SHARED / "nemo_memorized_laion_prompts.csv")
    assert set(ps.columns["type"]) == {"VM", "TM"}
    assert ps.texts[0] == "The No Limits Business Woman Podcast"


def test_formats_and_duplicates(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\na cat\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n', encoding="utf-8")
    (tmp_path / "p.csv").write_text("id,text\n7,a cat\n9,a dog\n", encoding="utf-8")
    pq.write_table(pa.table({"caption": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    for name in ("p.txt", "p.jsonl", "p.csv", "p.parquet"):
        ps = load_prompts(tmp_path / name)
        assert ps.texts == ["a cat", "a dog"], name
    txt = load_prompts(tmp_path / "p.txt")
    assert txt.duplicates == 1 and txt.ids == ["0", "1"]  # row numbers among non-empty lines
    assert load_prompts(tmp_path / "p.csv").ids == ["7", "9"]


@pytest.mark.parametrize("content,suffix,message", [
    (b"", ".txt", "is empty"),
    (b"\n  \n", ".txt", "is empty"),
    (b"caf\xe9 au lait\n", ".txt", "is not UTF-8 text"),
    (b"url,index\nhttp://x,1\n", ".csv", "has no caption column"),
    (b'{"caption": "a"}\n{bad\n', ".jsonl", "line 2: not valid JSON"),
    (b"a cat", ".docx", "unsupported extension"),
])
def test_bad_prompt_files(tmp_path, content, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    with pytest.raises(PromptError, match=message):
        load_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "none.txt")
