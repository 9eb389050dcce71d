"""Prompt files as users bring them: ``.txt``, ``.jsonl``, ``.csv`` (comma or ``;``) and ``.parquet``.

Every file in ``../shared/data/prompts`` (the field's public lists) loads as it is. Duplicate prompts
are kept once (first occurrence) and counted, so each prompt is scored exactly once.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.errors import PromptError

if TYPE_CHECKING:
    from collections.abc import Sequence

CAPTION_COLUMNS = ("caption", "prompt", "text", "Caption", "Prompt", "Text", "TEXT")
ID_COLUMNS = ("id", "prompt_id", "item_id")


@dataclass
class PromptSet:
    """Unique prompts with stable ids (row number in the file unless it has an id column)."""

    ids: list[str]
    texts: list[str]
    source: str
    columns: dict[str, list] = field(default_factory=dict)
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: Sequence[int]) -> PromptSet:
        """The prompts at ``rows`` (positions, in that order), ids and columns kept."""
        return PromptSet([self.ids[i] for i in rows], [self.texts[i] for i in rows], self.source,
                         {k: [v[i] for i in rows] for k, v in self.columns.items()}, self.duplicates)

    def evenly(self, n: int) -> PromptSet:
        """At most ``n`` prompts, evenly spaced (every kind of a sorted file keeps its share), columns kept."""
        if n >= len(self):
            return self
        return self.take([round(i * len(self) / n) for i in range(n)])


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"prompt file '{path}' is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "re-encode it as UTF-8") from exc


def _caption_column(columns: list[str], path: Path, caption_column: str | None) -> str:
    if caption_column is not None:
        if caption_column not in columns:
            raise PromptError(f"prompt file '{path}' has no column {caption_column!r}; columns: {columns}")
        return caption_column
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise PromptError(f"prompt file '{path}' has no caption column; expected one of {list(CAPTION_COLUMNS)}, "
                      f"found {columns}")


def _rows_from_records(records: list[dict], path: Path, caption_column: str | None) -> tuple[list[str], list[dict]]:
    if not records:
        raise PromptError(f"prompt file '{path}' is empty: expected at least one prompt")
    col = _caption_column(list(records[0].keys()), path, caption_column)
    texts = []
    for i, r in enumerate(records):
        value = r.get(col)
        if not isinstance(value, str):
            raise PromptError(f"prompt file '{path}', row {i}: column {col!r} is {value!r}, expected text")
        texts.append(value)
    return texts, records


def read_rows(path: Path, caption_column: str | None = None) -> tuple[list[str], list[dict]]:
    """(captions, raw records) of a prompt file in any supported format."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise PromptError(f"prompt file '{path}' is not a readable Parquet file: {exc}") from exc
        return _rows_from_records(records, path, caption_column)
    text = _read_text(path)
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptError(f"prompt file '{path}', line {n}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise PromptError(f"prompt file '{path}', line {n}: a JSON {type(record).__name__}, expected an "
                                      'object such as {"caption": "..."} (plain prompts go in a .txt file, one '
                                      "per line)")
                records.append(record)
        return _rows_from_records(records, path, caption_column)
    if suffix in (".csv", ".tsv"):
        head = text.split("\n", 1)[0]
        delimiter = "\t" if suffix == ".tsv" else max([",", ";", "\t"], key=head.count)
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter, strict=True)
        try:
            records = list(reader)
        except csv.Error as exc:  # e.g. an unterminated quote that would swallow the rest of the file
            raise PromptError(f"prompt file '{path}' is malformed CSV ({exc}); check for an unterminated or "
                              "stray quote") from exc
        return _rows_from_records(records, path, caption_column)
    if suffix in (".txt", ""):
        lines = [line.strip() for line in text.splitlines()]
        records = [{"caption": line} for line in lines if line]
        return _rows_from_records(records, path, None)
    raise PromptError(f"prompt file '{path}' has unsupported extension {suffix!r}; "
                      "expected .txt, .jsonl, .csv, .tsv or .parquet")


def load_prompts(path: str | Path, caption_column: str | None = None) -> PromptSet:
    """Load a prompt file, dropping repeated prompts (counted in ``duplicates``)."""
    path = Path(path)
    if path.is_dir():
        raise PromptError(f"prompt file '{path}' is a folder; expected a file (.txt, .jsonl, .csv, .tsv or .parquet)")
    if not path.is_file():
        raise PromptError(f"prompt file '{path}' does not exist")
    texts, records = read_rows(path, caption_column)
    id_col = next((c for c in ID_COLUMNS if c in records[0]), None)
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        if t.strip() == "":
            continue
        if t not in seen:
            seen.add(t)
            keep.append(i)
    if not keep:
        raise PromptError(f"prompt file '{path}' holds only empty prompts")
    ids = [str(records[i][id_col]) if id_col else str(i) for i in keep]
    extra_cols = [c for c in records[0] if c not in (id_col,)]
    columns = {c: [records[i].get(c) for i in keep] for c in extra_cols}
    return PromptSet(ids=ids, texts=[texts[i] for i in keep], source=str(path), columns=columns,
                     duplicates=len([t for t in texts if t.strip()]) - len(keep))


def prompts_from_list(texts: list[str], source: str = "<list>") -> PromptSet:
    """A :class:`PromptSet` from strings (duplicates dropped as for files)."""
    if not texts:
        raise PromptError("empty prompt list: expected at least one prompt")
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        seen.setdefault(t, i)
    keep = sorted(seen.values())
    return PromptSet(ids=[str(i) for i in keep], texts=[texts[i] for i in keep], source=source,
                     duplicates=len(texts) - len(keep))
