"""Rewrite the path fields of shipped results files in place, without rerunning anything.

Every string in ``benchmarks/results/**/*.json`` and ``*.jsonl`` that is an absolute path (a model folder, a
labels file, a work folder) becomes the path relative to the checkout that wrote it, or the file's name when it
lay outside any checkout (:func:`diffmem.provenance.portable_path`). Only those strings change: the file is
edited as text, so every other byte (numbers, indentation, key order) stays as it was written.

The checkout that wrote a path is found from the path itself: the part before the first component that is a
top-level entry of this repository (``diffmem``, ``benchmarks``...) or ``runs`` (the run folders the docs use).
Name it with ``--old-root`` where that guess does not fit.

    .venv/bin/python benchmarks/scrub_paths.py            # rewrites, prints each file it changed
    .venv/bin/python benchmarks/scrub_paths.py --check    # lists what it would change; exit 1 if anything
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path, PurePosixPath

from diffmem.io import atomic_write_text
from diffmem.provenance import REPO_ROOT, machine_paths, portable_path

RESULTS = REPO_ROOT / "benchmarks" / "results"
RUN_FOLDERS = ("runs",)


def guessed_root(path: str, top_level: set[str]) -> str | None:
    """The folder above the first component of ``path`` that is one of ``top_level``; None if none is."""
    parts = PurePosixPath(path).parts
    for i, part in enumerate(parts[1:], start=1):
        if part in top_level:
            return str(PurePosixPath(*parts[:i]))
    return None


def rewritten(text: str, records: list, old_roots: list[str], top_level: set[str]) -> tuple[str, list[str]]:
    """``text`` with each absolute path string in ``records`` replaced, and the replacements made."""
    done: list[str] = []
    for _, value in sorted({hit for record in records for hit in machine_paths(record)}, key=lambda h: -len(h[1])):
        roots = [r for r in old_roots if PurePosixPath(r) in PurePosixPath(value).parents]
        root = roots[0] if roots else guessed_root(value, top_level)
        new = portable_path(value, root)
        old_token, new_token = json.dumps(value), json.dumps(new)
        if old_token in text:
            text = text.replace(old_token, new_token)
            done.append(f"{value} -> {new}")
    return text, done


def load_records(path: Path, text: str) -> list:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [json.loads(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder searched for .json and .jsonl")
    parser.add_argument("--old-root", action="append", default=[], help="a checkout that wrote the files")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file holds a path")
    args = parser.parse_args(argv)
    top_level = {p.name for p in REPO_ROOT.iterdir() if not p.name.startswith(".")} | set(RUN_FOLDERS)
    changed = 0
    for path in sorted(p for p in args.results.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()):
        text = path.read_text()
        records = load_records(path, text)
        new_text, done = rewritten(text, records, args.old_root, top_level)
        if not done:
            continue
        changed += 1
        left = [hit for record in load_records(path, new_text) for hit in machine_paths(record)]
        if left:
            raise SystemExit(f"{path}: paths left after rewriting: {left}")
        print(f"{path.relative_to(REPO_ROOT) if REPO_ROOT in path.parents else path}: {len(done)} path(s)")
        for line in done:
            print(f"    {line}")
        if not args.check:
            atomic_write_text(path, new_text)
    print(f"{changed} file(s) {'hold paths' if args.check else 'rewritten'}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
