"""``diffmem report RUN_DIR ... --out FILE``: the CLI side of :mod:`diffmem.report` (it brings the zoo's
gallery source, so the report module itself stays general)."""

from __future__ import annotations

import argparse
from pathlib import Path


def run_report_command(args: argparse.Namespace) -> None:
    """Refuses to replace an input file or a file it did not write; a new report may sit in a run folder."""
    from diffmem.outputs import REPORT_SIGNATURE, check_output_file
    from diffmem.report import build_report
    from diffmem.zoo.gallery import ZooGallery

    check_output_file(args.out, [r for r in args.runs if Path(r).is_file()], args.force, signature=REPORT_SIGNATURE)
    print(f"report: {build_report(args.runs, args.out, args.gallery, gallery=ZooGallery())}")
