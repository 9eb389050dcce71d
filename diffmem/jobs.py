"""Resumable, shardable chunked jobs: the machinery behind ``scan`` and ``extract``.

A job maps fixed chunks of a prompt list to columns. Each finished chunk is written as one Parquet
part atomically (``parts/rankRRR-KKKKKK.parquet``), so a killed job loses at most the chunk in
flight and a rerun skips finished parts; rank 0 merges all parts into one table (one row per prompt,
in input order). ``provenance.json`` is written first and a rerun with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_bytes, atomic_write_text
from diffmem.prompts import PromptSet

log = logging.getLogger(__name__)
PROVENANCE_FILE = "provenance.json"


def versions() -> dict[str, str]:
    """Library versions for provenance files."""
    import diffusers
    import torch
    import transformers

    import diffmem

    return {"diffmem": diffmem.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def settings_digest(obj: Any) -> str:
    """First 10 hex digits of sha256 over JSON-able settings (keys sorted): names a folder after what determines
    its contents, so other settings get another folder instead of a refusal."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prompt_hash(prompts: PromptSet) -> str:
    """First 16 hex digits of sha256 over (id, text) of every prompt."""
    h = hashlib.sha256()
    for i, t in zip(prompts.ids, prompts.texts):
        h.update(f"{i}\t{t}\n".encode())
    return h.hexdigest()[:16]


def write_parquet(table: pa.Table, path: Path) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _comparable(p: dict) -> dict:
    """Settings that decide the results, compared by content: the prompts' hash, not the path as typed;
    the model's fingerprint, not its folder; no library versions, device or flagging record."""
    p = json.loads(json.dumps(p, default=str))
    for key in ("versions", "flagging"):
        p.pop(key, None)
    if isinstance(p.get("model"), dict):
        for key in ("device", "source"):
            p["model"].pop(key, None)
    if isinstance(p.get("prompts"), dict):
        p["prompts"].pop("source", None)
        p["prompts"].pop("truncated", None)  # an outcome of the scan (added at its merge), not a setting
    return p


def _label(a: Any, b: Any, index: int) -> str:
    """How a list entry is named in a difference: its ``name`` when both sides share one (a detector), else its
    index."""
    if isinstance(a, dict) and isinstance(b, dict) and a.get("name") and a.get("name") == b.get("name"):
        return str(a["name"])
    return str(index)


def _paths(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any, Any]]:
    """``(path, old value, new value)`` of every leaf setting that differs; lists of equal length are compared
    entry by entry (a detector list by detector name), so a refusal names the one setting that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _paths(old.get(key), new.get(key), (*path, str(key)))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and old != new:
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += _paths(a, b, (*path, _label(a, b, i)))
        return out
    return [] if old == new else [(path or ("settings",), old, new)]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two provenance records (``detectors.anisotropy.k``)."""
    return [prefix + ".".join(path) for path, _, _ in _paths(old, new)]


def _describe(name: str, old: Any, new: Any) -> str:
    """One difference with both values in full (a refusal must show what to change, not a cut-off value)."""
    return f"{name} ({json.dumps(new, default=str)} now, {json.dumps(old, default=str)} before)"


def refuse_other_settings(out: Path, old: dict, new: dict) -> None:
    """Raise the one-line refusal of a folder whose settings ``old`` differ from ``new`` (both :func:`_comparable`)
    naming every differing setting with both values; nothing when they agree."""
    diff = _paths(old, new)
    if not diff:
        return
    named = "; ".join(_describe(".".join(path), a, b) for path, a, b in diff)
    raise DiffmemError(f"'{out}' holds a run with other settings: {named}; rerun with the earlier settings to "
                       "resume, or use another --out")


def check_resume_before_load(out: Path, partial: dict) -> None:
    """Refuse resuming ``out`` when the settings known before the model loads (``partial``: e.g. the model's
    fingerprint from its files, the prompts' hash and count, the scan settings) differ from the ones its
    ``provenance.json`` records, so the refusal comes before minutes of weight loading; settings ``partial``
    does not hold are compared later by :func:`claim_folder`."""
    path = out / PROVENANCE_FILE
    if not path.is_file():
        return
    old = _comparable(json.loads(path.read_text()))

    def restrict(record: Any, shape: Any) -> Any:
        if isinstance(shape, dict) and isinstance(record, dict):
            return {k: restrict(record.get(k), v) for k, v in shape.items()}
        return record

    refuse_other_settings(out, restrict(old, _comparable(partial)), _comparable(partial))


def claim_folder(out: Path, provenance: dict, rank: int, command: str = "scan") -> None:
    """Write ``provenance.json`` (rank 0) or check that an existing one has the same settings.

    A refusal names each setting that differs (e.g. ``prompts.sha256_16``, ``settings.n_draws``) with both
    values. Rank 0 also marks the folder as ``command``'s output (see :mod:`diffmem.outputs`), so a rerun may
    resume it.
    """
    from diffmem.outputs import claim_output_dir

    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        claim_output_dir(out, command, [PROVENANCE_FILE, "parts"])
    path = out / PROVENANCE_FILE
    if path.is_file():
        refuse_other_settings(out, _comparable(json.loads(path.read_text())), _comparable(provenance))
    elif rank == 0:
        atomic_write_text(path, json.dumps(provenance, indent=2, default=str))


def run_chunks(prompts: PromptSet, out: Path, batch_size: int,
               score: Callable[[list[int]], dict[str, np.ndarray | list]], rank: int = 0, world_size: int = 1,
               desc: str = "job", progress: bool = True, before_first: Callable[[], None] | None = None) -> None:
    """Run ``score(positions)`` on every unfinished chunk of this rank's shard, writing one part each."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    shard = list(range(rank, len(prompts), world_size))
    chunks = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    todo = [(k, c) for k, c in enumerate(chunks) if not (parts / f"rank{rank:03d}-{k:06d}.parquet").is_file()]
    if todo and before_first is not None:
        before_first()
    bar = tqdm(total=len(shard), initial=len(shard) - sum(len(c) for _, c in todo), desc=f"{desc}[{rank}]",
               disable=not progress, dynamic_ncols=True)
    for k, chunk in todo:
        columns = score(chunk)
        table = pa.table({"position": pa.array(chunk, pa.int64()), **{n: v for n, v in columns.items()}})
        write_parquet(table, parts / f"rank{rank:03d}-{k:06d}.parquet")
        bar.update(len(chunk))
    bar.close()


def merge_parts(out: Path, prompts: PromptSet, world_size: int, batch_size: int, filename: str) -> Path | None:
    """Join every shard's parts into ``out/filename`` (input order, each prompt exactly once)."""
    expected = sum(math.ceil(len(range(r, len(prompts), world_size)) / batch_size) for r in range(world_size))
    files = sorted((out / "parts").glob("rank*.parquet"))
    if len(files) < expected:
        log.warning("%d of %d parts are written; rerun to finish", len(files), expected)
        return None
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("position")
    if table.column("position").to_pylist() != list(range(len(prompts))):
        raise DiffmemError(f"parts in '{out / 'parts'}' do not cover the prompts exactly once; delete the folder")
    columns: dict[str, Any] = {"id": prompts.ids, "text": prompts.texts}
    for name in table.column_names:
        if name != "position":
            columns[name] = table.column(name)
    for extra, values in prompts.columns.items():
        if extra not in ("caption", "prompt", "text"):
            columns[f"input_{extra}"] = [None if v is None else str(v) for v in values]
    return write_parquet(pa.table(columns), out / filename)
