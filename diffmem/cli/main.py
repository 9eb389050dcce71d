"""The ``diffmem`` command line: ``demo``, ``zoo build``, ``zoo label``, ``zoo info``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from diffmem.errors import DiffmemError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local diffusers pipeline folder (default: the embedded zoo)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU, else float16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmem", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="load a model (default: the zoo), show its manifest, generate a sample grid")
    _add_model_args(demo)
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--per-group", type=int, default=6, help="prompts per group in the grid (default: 6)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default: 3)")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    demo.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    demo.add_argument("--draws", type=int, default=8, help="noise draws of the closing scan (default: 8)")
    demo.add_argument("--scan-prompts", type=int, default=400, help="zoo captions in the closing scan (default: 400)")
    demo.add_argument("--scan-samples", type=int, default=2,
                      help="generations per caption of the scan's nn-margin detector, 0 to skip it (default: 2)")
    demo.add_argument("--no-report", action="store_true", help="skip the closing scan and HTML report")

    from diffmem.cli.scan_commands import add_scan_args

    scan = sub.add_parser("scan", help="score prompts with memorization detectors (resumable, shardable)")
    _add_model_args(scan)
    add_scan_args(scan, "runs/scan")
    scan.add_argument("--calibration", default=None, help="calibration.json from `diffmem calibrate`")
    scan.add_argument("--fpr", type=float, default=None, help="flag at this false-positive rate (needs --calibration)")
    scan.add_argument("--top", type=int, default=10, help="prompts shown per detector (default: 10)")

    calibrate = sub.add_parser("calibrate", help="fit detector thresholds on prompts known to be ordinary")
    _add_model_args(calibrate)
    add_scan_args(calibrate, "runs/calibration")

    ev = sub.add_parser("eval", help="evaluate stored results")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    detect = esub.add_parser("detect", help="AUROC and TPR at low FPR of a scan against labels")
    detect.add_argument("--scores", required=True, help="scores.parquet of a scan")
    detect.add_argument("--labels", required=True, help="labels file (the zoo's labels.jsonl or any prompt file)")
    detect.add_argument("--label-column", default="memorized", help="boolean label column (default: memorized)")
    detect.add_argument("--rate-column", default=None,
                        help="label from a replication-rate column instead: memorized when rate >= --positive-rate, "
                             "ordinary when rate == 0, prompts in between left out (stochastic labels)")
    detect.add_argument("--positive-rate", type=float, default=0.5, help="with --rate-column (default: 0.5)")
    detect.add_argument("--split-by", default=None, help="also report positives per value of this column")
    detect.add_argument("--out", default="runs/eval-detect", help="output folder (default: runs/eval-detect)")

    from diffmem.cli.extract_commands import add_extract_args

    extract = sub.add_parser("extract", help="run extraction attacks and match generations to training data")
    _add_model_args(extract)
    add_extract_args(extract)

    mitigate = sub.add_parser("mitigate", help="patch a checkpoint (or write an inference-time config)")
    mitigate.add_argument("method", help="mitigator name (see README)")
    _add_model_args(mitigate)
    mitigate.add_argument("--prompts", default=None, help="memorized prompts (default: the zoo's memorized captions)")
    mitigate.add_argument("--caption-column", default=None)
    mitigate.add_argument("--reference", default=None, help="ordinary prompts (default: zoo generic captions)")
    mitigate.add_argument("--out", required=True, help="output folder (never the input checkpoint)")
    mitigate.add_argument("--option", action="append", help="method option key=value (repeatable)")

    bench = sub.add_parser("bench", help="every mitigator on the zoo: memorization removed vs quality kept")
    _add_model_args(bench)
    bench.add_argument("--mitigators", nargs="+", default=None, help="methods (default: all)")
    bench.add_argument("--out", default="runs/bench")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--option", action="append", default=None,
                       help="METHOD.KEY=VALUE for a mitigator, or retrigger.KEY=VALUE for the adaptive attack "
                            "(e.g. retrigger.lr=0.01; repeatable)")

    report = sub.add_parser("report", help="one self-contained HTML report of run folders")
    report.add_argument("runs", nargs="+", help="run folders (scan, extract, eval, benchmark JSON)")
    report.add_argument("--out", default="runs/report.html", help="HTML file (default: runs/report.html)")
    report.add_argument("--gallery", type=int, default=6, help="prompts in each scan's gallery (default: 6)")

    ds = sub.add_parser("deepssim", help="train the DeepSSIM image embedder")
    dsub = ds.add_subparsers(dest="deepssim_command", required=True)
    dtrain = dsub.add_parser("train", help="train on the zoo corpus (default) or an image folder")
    dtrain.add_argument("--images", default=None, help="image folder (default: the zoo's training images)")
    dtrain.add_argument("--out", required=True, help="folder for model.safetensors, config.json, agreement.json")
    dtrain.add_argument("--steps", type=int, default=1500)
    dtrain.add_argument("--seed", type=int, default=0)

    zoo = sub.add_parser("zoo", help="build, label or describe the memorization zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zsub.add_parser("build", help="train the zoo from its seed (resumable)")
    build.add_argument("--out", required=True, help="folder to write the zoo to")
    build.add_argument("--work-dir", default=None, help="checkpoint folder (default: OUT.work); rerun to resume")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--vae-steps", type=int, default=None)
    build.add_argument("--unet-steps", type=int, default=None)
    build.add_argument("--no-label", action="store_true", help="skip the ground-truth extraction")
    label = zsub.add_parser("label", help="(re)compute the zoo's ground-truth labels by extraction")
    label.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    label.add_argument("--seeds", type=int, default=4, help="generations per caption (default: 4)")
    label.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    info = zsub.add_parser("info", help="print the zoo's manifest summary and labels table")
    info.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    return parser


# command -> "module:function" taking the parsed arguments; imported lazily so `--help` stays fast
HANDLERS = {
    "demo": "diffmem.cli.demo:run_demo",
    "scan": "diffmem.cli.scan_commands:run_scan_command",
    "calibrate": "diffmem.cli.scan_commands:run_calibrate",
    "eval": "diffmem.cli.scan_commands:run_eval_detect",
    "extract": "diffmem.cli.extract_commands:run_extract_command",
    "mitigate": "diffmem.cli.mitigate_commands:run_mitigate",
    "bench": "diffmem.cli.mitigate_commands:run_bench_command",
    "report": "diffmem.report:run_report_command",
    "deepssim": "diffmem.cli.deepssim_commands:run_train",
    "zoo": "diffmem.cli.zoo_commands",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="diffmem: %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        handler = HANDLERS[args.command]
        if args.command == "zoo":
            handler = f"{handler}:run_{args.zoo_command}"
        module, _, name = handler.partition(":")
        getattr(importlib.import_module(module), name)(args)
    except DiffmemError as exc:
        print(f"diffmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffmem: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
