"""``diffmem report RUN_DIR ... --out FILE``: the CLI side of :mod:`diffmem.report` (it brings the zoo's
gallery source, so the report module itself stays general)."""

from __future__ import annotations

import argparse

from diffmem.cli.options import add_file_force, handled_by, non_negative_int


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem report``."""
    report = handled_by(sub.add_parser("report", help="one self-contained HTML report of run folders"),
                        "diffmem.cli.report_commands:run_report_command")
    report.add_argument("runs", nargs="+", help="run folders (scan, extract, eval, benchmark JSON)")
    report.add_argument("--out", default="runs/report.html",
                        help="HTML file, outside every run folder; an earlier report is replaced, any other file "
                             "is refused (default: runs/report.html)")
    add_file_force(report)
    report.add_argument("--gallery", type=non_negative_int, default=6,
                        help="prompts in each scan's gallery, 0 for none (default: 6)")


def run_report_command(args: argparse.Namespace) -> None:
    """Refuses a report inside an input run folder (or replacing an input file), and any existing file it did not
    write (``--force`` does not change that)."""
    from diffmem.outputs import REPORT_SIGNATURE, check_output_file
    from diffmem.report import build_report
    from diffmem.zoo.gallery import ZooGallery

    check_output_file(args.out, args.runs, signature=REPORT_SIGNATURE)
    print(f"report: {build_report(args.runs, args.out, args.gallery, gallery=ZooGallery())}")
