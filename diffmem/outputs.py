"""Safe output locations: no diffmem command deletes or overwrites a file it did not write.

Rules shared by every command that writes a folder or a file (scan, calibrate, eval detect, extract,
mitigate, bench, report, zoo build, deepssim train, demo):

- an ``--out`` that is an input (the model folder, a prompt file, an image folder...), lies inside
  one, or contains one is refused: the README promises that inputs are never written to;
- nothing is ever written inside the installed ``diffmem`` package (:data:`PACKAGE_DIR`: the shipped zoos
  and their ground-truth labels live there);
- an existing non-empty ``--out`` is refused unless it holds an earlier output of the *same* command
  (recorded in the marker file :data:`MARKER`, written by us; a command that has methods, such as
  ``mitigate``, records its method too: ``mitigate nemo``) or ``force`` is given;
- ``force`` never reuses the output of another command or method, and only names diffmem writes are
  replaced; a user's file that would be replaced is refused by name, and nothing else in the folder is
  touched; a single-file output (a report) is replaced only when it is an earlier output of ours;
- folders produced in one go (patched checkpoints, DeepSSIM weights, the zoo) are staged in a hidden
  temporary sibling and moved in with renames (:func:`staged`, :func:`publish`), so an interruption
  leaves either the old output or the new one, never a mix; a failed or terminated run (the CLI turns
  SIGTERM into an exception) leaves no staging folder behind;
- files and folders we write are group- and world-readable (0o644 / 0o755) whatever the umask, so a
  report or checkpoint can be shared.

Validation (:func:`check_output_dir`, :func:`check_output_file`) writes nothing, so a command can
validate ``--out`` before loading a model; :func:`claim_output_dir` then creates the folder and marker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffmem.errors import DiffmemError

log = logging.getLogger(__name__)

MARKER = ".diffmem-output.json"
FILE_MODE = 0o644
DIR_MODE = 0o755
REPORT_SIGNATURE = "<!-- written by diffmem report -->"
PACKAGE_DIR = Path(__file__).resolve().parent  # the installed diffmem package: never written to


class OutputError(DiffmemError):
    """An output location would overwrite an input or a file diffmem did not write."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_package(out: str | Path, flag: str = "--out") -> None:
    """Refuse ``out`` inside the installed diffmem package: its shipped zoos and labels are ground truth that a
    trial run must not replace (a maintainer refreshing them copies a new output in, deliberately)."""
    if _is_within(_resolved(out), PACKAGE_DIR):
        raise OutputError(f"{flag} '{out}' is inside the installed diffmem package '{PACKAGE_DIR}'; diffmem never "
                          "writes there (the shipped zoos and labels live there): choose a folder outside it")


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse ``out`` inside the installed package, or equal to, inside, or containing any of ``inputs`` (None
    entries are skipped)."""
    check_not_package(out, flag)
    target = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        src = _resolved(item)
        if target == src:
            raise OutputError(f"{flag} '{out}' is the input '{item}'; diffmem never overwrites an input, "
                              "choose another folder")
        if _is_within(target, src):
            raise OutputError(f"{flag} '{out}' is inside the input '{item}'; diffmem never overwrites an input, "
                              "choose a folder outside it")
        if _is_within(src, target):
            raise OutputError(f"{flag} '{out}' contains the input '{item}'; writing there could replace it, "
                              "choose a folder that does not hold the input")


def read_marker(folder: str | Path) -> dict | None:
    """The marker of an earlier diffmem output in ``folder``, or None."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "command" in record else None


def _in_flight(path: Path) -> bool:
    """A temporary file of an atomic write in progress (another rank claiming the folder right now)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(path: Path, flag: str, is_file: bool = False) -> None:
    parent = _nearest_existing(path.parent if is_file or not path.exists() else path)
    if not parent.is_dir():
        raise OutputError(f"{flag} '{path}' cannot be created: '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} '{path}' is not writable (no write permission on '{parent}', "
                          "or a read-only filesystem); choose another folder")


def check_output_dir(out: str | Path, command: str, inputs: Iterable[str | Path | None] = (),
                     force: bool = False, writes: Iterable[str] = (), flag: str = "--out") -> str:
    """Validate an output folder without writing anything; returns ``"new"``, ``"ours"`` or ``"forced"``.

    ``writes`` are the top-level names the command writes there; with ``force`` in a folder diffmem did
    not make, any of them that already exists is refused by name (it would be replaced).
    """
    path = Path(out).expanduser()
    check_not_input(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} '{out}' is an existing file; expected a folder (choose another path)")
    _check_writable(path, flag)
    if not path.exists() or not [p for p in path.iterdir() if not _in_flight(p)]:
        return "new"
    marker = read_marker(path)
    if marker is not None and marker["command"] == command:
        return "ours"
    if marker is not None:  # another command's (or method's) output is never ours, not even with --force
        raise OutputError(f"{flag} '{out}' already holds an output of `diffmem {marker['command']}`, not of "
                          f"`diffmem {command}`; choose an empty or new folder")
    if not force:
        raise OutputError(f"{flag} '{out}' already holds files diffmem did not write; choose an empty or new "
                          "folder, or add --force (which only adds and replaces diffmem's own files)")
    clash = sorted(n for n in writes if (path / n).exists())
    if clash:
        raise OutputError(f"{flag} '{out}': --force would replace {clash}, which diffmem did not write; "
                          "move them or choose another folder")
    return "forced"


def claim_output_dir(out: str | Path, command: str, writes: Iterable[str] = ()) -> Path:
    """Create ``out`` (0o755) and record that it holds output of ``command`` (call after validation)."""
    path = Path(out).expanduser()
    _makedirs(path)
    marker = read_marker(path)
    if marker is None or marker.get("command") != command:
        marker = {"command": command, "files": []}
    files = sorted(set(marker.get("files", [])) | set(writes))
    if marker.get("command") == command and files == marker.get("files") and (path / MARKER).is_file():
        return path
    _write_text(path / MARKER, json.dumps({"command": command, "files": files}, indent=1))
    return path


def check_output_file(out: str | Path, inputs: Iterable[str | Path | None] = (), signature: str | None = None,
                      flag: str = "--out", example: str = "report.html") -> None:
    """Validate an output file: not an input nor inside one (a run folder), not a folder, parent writable; an
    existing file is replaced only when its head holds ``signature`` (an earlier output of ours), never
    otherwise: ``--force`` does not hand a user's file over (``example`` names a file for the folder hint)."""
    path = Path(out).expanduser()
    check_not_input(path, inputs, flag)
    if path.is_dir():
        raise OutputError(f"{flag} '{out}' is a folder; expected a file path (e.g. {Path(out) / example})")
    _check_writable(path, flag, is_file=True)
    if path.exists():
        with path.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", "replace")
        if signature is None or signature not in head:
            raise OutputError(f"{flag} '{out}' is an existing file diffmem did not write; diffmem never replaces "
                              "it (not even with --force): choose another path")


def _makedirs(path: Path) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder '{path}': {exc.strerror or exc}") from exc
    for p in missing:
        os.chmod(p, DIR_MODE)


def _write_text(path: Path, text: str) -> None:
    from diffmem.io import atomic_write_text

    atomic_write_text(path, text)


def make_shareable(root: str | Path) -> None:
    """chmod every file under ``root`` to 0o644 and every folder to 0o755 (umask-independent)."""
    root = Path(root)
    if root.is_file():
        os.chmod(root, FILE_MODE)
        return
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), DIR_MODE)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), FILE_MODE)


def staging_dir(out: str | Path) -> Path:
    """A fresh hidden temporary sibling of ``out`` to build a folder output in (see :func:`publish`)."""
    out = Path(out).expanduser()
    _makedirs(out.parent)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def publish(staging: str | Path, out: str | Path, command: str) -> Path:
    """Move a staged folder to ``out`` atomically; only diffmem's own names in ``out`` are replaced.

    If ``out`` does not exist (or is empty) the staged folder is renamed onto it in one step. Otherwise
    each top-level entry is swapped in by rename, the replaced entries go to a trash sibling that is
    deleted last; entries of ``out`` that the staging folder does not hold are left as they are.
    Call :func:`check_output_dir` first: this refuses a clash with a name diffmem did not write.
    """
    staging, out = Path(staging), Path(out).expanduser()
    names = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
    marker = read_marker(out) if out.is_dir() else None
    ours = set(marker.get("files", [])) if marker is not None and marker["command"] == command else set()
    if out.is_dir():
        clash = sorted(n for n in names if (out / n).exists() and n not in ours)
        if clash:
            raise OutputError(f"'{out}': writing would replace {clash}, which diffmem did not write")
    _write_text(staging / MARKER, json.dumps({"command": command, "files": sorted(set(names) | ours)}, indent=1))
    make_shareable(staging)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return out
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
    for name in [*names, MARKER]:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, trash / name)
        os.replace(staging / name, out / name)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def discard(staging: str | Path) -> None:
    """Remove a staging folder made by :func:`staging_dir` (after a failure)."""
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged(out: str | Path, command: str) -> Iterator[Path]:
    """Build a folder output in a fresh hidden sibling of ``out`` and :func:`publish` it when the block ends;
    on any exception (``KeyboardInterrupt``, or the CLI's SIGTERM exception) the staging folder is removed and
    the exception goes on, so an interrupted run leaves no ``.NAME.*.partial`` folder behind."""
    staging = staging_dir(out)
    try:
        yield staging
        publish(staging, out, command)
    except BaseException:
        discard(staging)
        raise
