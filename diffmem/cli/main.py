"""The ``diffmem`` command line: ``demo``, ``zoo build``, ``zoo label``, ``zoo info``."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from collections.abc import Sequence

from diffmem.errors import DiffmemError
from diffmem.zoo.schedule import SCHEDULES

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``diffmem: error: ...``, exit 2) and ``-v``/``--quiet`` accepted
    after the subcommand as well as before it."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"diffmem: error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def add_parser_common(self) -> None:
        # SUPPRESS: a subcommand's default never overrides the flag given before the subcommand
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="debug logging (default: off)")
        self.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                          help="no progress bars, weight-loading bars or library warnings (default: off)")


def _checked_number(parse, accept, expected: str):
    """An argparse type: ``parse(text)`` kept when ``accept(value)``, else one line saying what was expected."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value:g}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


positive_int = _checked_number(int, lambda v: v >= 1, "a whole number >= 1")
positive_float = _checked_number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
non_negative_int = _checked_number(int, lambda v: v >= 0, "a whole number >= 0")
open_unit_float = _checked_number(float, lambda v: 0 < v < 1, "0 < value < 1 (a false-positive rate)")


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="write into an existing --out that holds other files; only diffmem's own files are "
                        "replaced, never yours (default: off)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="zoo (the default zoo) | zoo:sd | zoo:collapse | a diffusers folder | a hub id org/name (read "
                        "from the Hugging Face cache; downloaded only when HF_HUB_OFFLINE=0) | one .safetensors file "
                        "(default: zoo)")
    p.add_argument("--config", default=None,
                   help="for a single .safetensors file: its family (sd1, sd2; their config files must be in the "
                        "Hugging Face cache offline) or a diffusers folder with its configs (default: inferred)")
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:N or mps; refused when absent (default: cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES, metavar="DTYPE",
                   help=f"one of {', '.join(DTYPES[:3])} (default: float32 on CPU, else float16)")


def registry_listing() -> str:
    """Every detector, attack and mitigator with the first line of its docstring (for ``--help``)."""
    from diffmem.attacks import ATTACKS
    from diffmem.detectors import DETECTORS
    from diffmem.mitigators import MITIGATORS

    lines = []
    for title, registry in (("detectors (--detector)", DETECTORS), ("attacks (--attack)", ATTACKS),
                            ("mitigators (mitigate METHOD, bench --mitigators)", MITIGATORS)):
        lines.append(f"{title}:")
        seen: dict[type, list[str]] = {}
        for name in registry.names():
            seen.setdefault(registry.get(name), []).append(name)
        for cls, names in seen.items():
            doc = (cls.__doc__ or "").strip().splitlines()
            main_name = cls.name if getattr(cls, "name", None) in names else names[0]
            rest = [n for n in names if n != main_name]
            alias = f" (alias {', '.join(rest)})" if rest else ""
            lines.append(f"  {main_name:<24}{doc[0] if doc else ''}{alias}")
    return "\n".join(lines)


class ListingHelp(Parser):
    """A parser whose ``--help`` ends with the registries' names (imported only when help is asked)."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + registry_listing() + "\n"


def add_zoo_recipe(p: argparse.ArgumentParser) -> None:
    """The flags that make a zoo build's recipe (corpus, seed, steps, rates), shared by ``zoo build`` and
    ``zoo estimate`` so both read the same configuration. Each overrides one field of the corpus's config."""
    p.add_argument("--corpus", choices=["sd", "collapse"], default="sd",
                   help="sd: the SD-like corpus of docs/zoo-sd.md (the default zoo, zoo:sd, from "
                        "diffmem/zoo/checkpoint_sd); collapse: the collapse zoo's corpus (zoo:collapse, from "
                        "diffmem/zoo/checkpoint) (default: sd)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and training (default: 0)")
    p.add_argument("--unet-lr-schedule", choices=SCHEDULES, default=None,
                   help="denoiser learning-rate schedule (default: the corpus's config: collapse constant, sd "
                        "wsd); 'wsd' holds the peak rate, then decays over the last --unet-lr-decay-steps, so "
                        "a constant run's work folder resumes into it")
    overrides = (
        ("--vae-steps", positive_int, "VAE training steps (default: the corpus's config: collapse 1000, sd 1500)"),
        ("--unet-steps", positive_int,
         "denoiser training steps (default: the corpus's config: collapse 2000, sd 11000)"),
        ("--unet-lr-decay-steps", positive_int,
         "with --unet-lr-schedule wsd: how many final steps decay the rate (default: the corpus's config: sd 3000)"),
        ("--unet-lr", positive_float, "denoiser peak learning rate (default: the corpus's config)"),
        ("--unet-snr-gamma", positive_float, "weight the denoiser's loss by Min-SNR-gamma (Hang et al. 2023) with "
                                             "this gamma (default: the corpus's config)"),
        ("--unet-seed", non_negative_int, "seed of the denoiser stage alone (initial weights, batches, noise), so a "
                                          "replicate trains on the same corpus, VAE and reader (default: --seed)"),
        ("--reader-steps", positive_int,
         "attribute reader training steps (default: the corpus's config: collapse 600, sd 1800)"),
    )
    for flag, parse, text in overrides:
        p.add_argument(flag, type=parse, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = ListingHelp(prog="diffmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: off)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars, weight-loading bars or library warnings (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser("demo", help="load a model (default: the zoo), show its manifest, generate a sample grid")
    _add_model_args(demo)
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    add_force(demo)
    demo.add_argument("--per-group", type=positive_int, default=6, help="prompts per group in the grid (default: 6)")
    demo.add_argument("--seeds", type=positive_int, default=3, help="seeds per prompt (default: 3)")
    demo.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    demo.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default: 7.5)")
    demo.add_argument("--draws", type=positive_int, default=8, help="noise draws of the closing scan (default: 8)")
    demo.add_argument("--scan-prompts", type=positive_int, default=400,
                      help="zoo captions in the closing scan (default: 400)")
    demo.add_argument("--scan-samples", type=non_negative_int, default=2,
                      help="generations per caption of the scan's nn-margin detector, 0 to skip it (default: 2)")
    demo.add_argument("--no-report", action="store_true", help="skip the closing scan and HTML report (default: off)")

    from diffmem.cli.scan_commands import add_scan_args

    scan = sub.add_parser("scan", help="score prompts with memorization detectors (resumable, shardable)")
    _add_model_args(scan)
    add_scan_args(scan, "runs/scan")
    scan.add_argument("--calibration", default=None,
                      help="calibration.json from `diffmem calibrate` on the same model and settings (default: none)")
    scan.add_argument("--fpr", type=open_unit_float, default=None,
                      help="flag at this false-positive rate, 0 < FPR < 1; needs --calibration (default: 0.01 "
                           "when --calibration is given)")
    scan.add_argument("--accept-calibration-mismatch", action="store_true",
                      help="use a calibration made on another model or with other detector settings, with a "
                           "warning (default: refused)")
    scan.add_argument("--top", type=positive_int, default=10, help="prompts shown per detector (default: 10)")

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
                             "ordinary when rate == 0, prompts in between left out (stochastic labels; "
                             "default: none)")
    detect.add_argument("--positive-rate", type=float, default=0.5, help="with --rate-column (default: 0.5)")
    detect.add_argument("--split-by", default=None,
                        help="also report positives per value of this column (default: none)")
    detect.add_argument("--out", default="runs/eval-detect", help="output folder (default: runs/eval-detect)")
    add_force(detect)

    from diffmem.cli.sample_commands import add_sample_args

    sample = sub.add_parser("sample", help="generate images for prompts, optionally through --mitigation FILE")
    _add_model_args(sample)
    add_sample_args(sample)

    from diffmem.cli.extract_commands import add_extract_args

    extract = sub.add_parser("extract", help="run extraction attacks and match generations to training data")
    _add_model_args(extract)
    add_extract_args(extract)

    mitigate = sub.add_parser("mitigate", help="patch a checkpoint (or write an inference-time config)")
    mitigate.add_argument("method", help="mitigator name (listed at the end of `diffmem --help`)")
    _add_model_args(mitigate)
    mitigate.add_argument("--prompts", default=None, help="memorized prompts (default: the zoo's memorized captions)")
    mitigate.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    mitigate.add_argument("--reference", default=None, help="ordinary prompts (default: zoo generic captions)")
    mitigate.add_argument("--out", required=True,
                          help="new output folder: a patched checkpoint, or mitigation.json for inference-time "
                               "methods (re-applied by scan/extract/sample --mitigation); never the input")
    add_force(mitigate)
    mitigate.add_argument("--train-index", default=None, metavar="DIR",
                          help="training images adversarial-finetune's model-made surrogates must not match "
                               "(default: they must differ from the model's own repeated generations)")
    mitigate.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                          help="method option, values parsed as JSON when they parse (repeatable; default: none)")

    bench = sub.add_parser("bench", help="every mitigator on a task (a zoo model's own, default: the default zoo's; or "
                                         "--memorized/--ordinary lists): memorization "
                                         "removed vs quality kept, tuned on dev, reported on test")
    _add_model_args(bench)
    bench.add_argument("--mitigators", nargs="+", default=None, help="methods (default: all)")
    bench.add_argument("--out", default="runs/bench", help="output folder; rerun to resume (default: runs/bench)")
    add_force(bench)
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                       help="split seeds: each cuts its own fit/dev/test splits; the table is the mean and spread "
                            "(default: 0 1)")
    bench.add_argument("--memorized", default=None, metavar="FILE",
                       help="memorized prompts of --model (with --ordinary: a folder task instead of the zoo; "
                            "default: none)")
    bench.add_argument("--ordinary", default=None, metavar="FILE", help="ordinary prompts of --model (default: none)")
    bench.add_argument("--train-index", default=None, metavar="DIR",
                       help="training images to match against (default: the original model's own generations of "
                            "the memorized prompts)")
    bench.add_argument("--clip-weights", default=None, metavar="FILE",
                       help="local open_clip weights for CLIP-score fidelity of a folder task (default: none)")
    bench.add_argument("--surrogates", choices=("model", "oracle"), default="model",
                       help="adversarial-finetune's surrogates: made from the model (default) or the zoo's "
                            "ground-truth renders ('oracle', an ablation)")
    bench.add_argument("--tune", action="append", default=None, metavar="METHOD.KEY=V1,V2",
                       help="candidate settings chosen on the dev split (repeatable; default: none)")
    bench.add_argument("--size", action="append", default=None, metavar="SPLIT=N",
                       help="split size, SPLIT in fit, dev, test, ordinary_fit, ordinary_dev, ordinary_test "
                            "(repeatable; default: 40, 24, 40, 128, 32, 64)")
    bench.add_argument("--samples", type=positive_int, default=3, help="generations per prompt (default: 3)")
    bench.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default: 25)")
    bench.add_argument("--attack-prompts", type=positive_int, default=16,
                       help="test prompts under the re-trigger attack (default: 16)")
    bench.add_argument("--attack-steps", type=positive_int, default=30,
                       help="re-trigger optimisation steps (default: 30)")
    bench.add_argument("--option", action="append", default=None, metavar="METHOD.KEY=VALUE",
                       help="METHOD.KEY=VALUE for a mitigator, or retrigger.KEY=VALUE for the adaptive attack "
                            "(e.g. retrigger.lr=0.01; repeatable; default: none)")

    report = sub.add_parser("report", help="one self-contained HTML report of run folders")
    report.add_argument("runs", nargs="+", help="run folders (scan, extract, eval, benchmark JSON)")
    report.add_argument("--out", default="runs/report.html", help="HTML file (default: runs/report.html)")
    add_force(report)
    report.add_argument("--gallery", type=non_negative_int, default=6,
                        help="prompts in each scan's gallery, 0 for none (default: 6)")

    ds = sub.add_parser("deepssim", help="train the DeepSSIM image embedder")
    dsub = ds.add_subparsers(dest="deepssim_command", required=True)
    dtrain = dsub.add_parser("train", help="train on the zoo corpus (default) or an image folder")
    dtrain.add_argument("--images", default=None, help="image folder (default: the zoo's training images)")
    dtrain.add_argument("--out", required=True, help="folder for model.safetensors, config.json, agreement.json")
    add_force(dtrain)
    dtrain.add_argument("--steps", type=positive_int, default=1500, help="training steps (default: 1500)")
    dtrain.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")

    zoo = sub.add_parser("zoo", help="build, label or describe the memorization zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zsub.add_parser("build", help="train the zoo from its seed (resumable)")
    build.add_argument("--out", required=True, help="folder to write the zoo to")
    add_force(build)
    build.add_argument("--work-dir", default=None, help="checkpoint folder (default: OUT.work); rerun to resume")
    add_zoo_recipe(build)
    build.add_argument("--no-label", action="store_true", help="skip the ground-truth extraction (default: off)")
    estimate = zsub.add_parser("estimate", help="project a build's time on this machine from two short probe "
                               "builds, before training (docs/zoo-sd.md)")
    add_zoo_recipe(estimate)
    estimate.add_argument("--probe-steps", type=positive_int, nargs=2, default=[5, 25], metavar=("SMALL", "LARGE"),
                          help="steps of every stage in the two probe builds (default: 5 25)")
    estimate.add_argument("--out", default=None, help="also write the estimate as JSON here (default: print only)")
    add_force(estimate)
    label = zsub.add_parser("label", help="(re)compute the zoo's ground-truth labels by extraction")
    label.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    label.add_argument("--seeds", type=positive_int, default=4, help="generations per caption (default: 4)")
    label.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default: 25)")
    label.add_argument("--titles", type=positive_int, default=1000,
                       help="SD-like zoo: once-seen titles labelled, a fixed random sample (default: 1000)")
    info = zsub.add_parser("info", help="print the zoo's manifest summary and labels table")
    info.add_argument("--zoo", default=None, help="zoo folder (default: the embedded zoo)")
    check = zsub.add_parser("check-corpus", help="the corpus gate, before training: does an ideal denoiser's "
                            "guidance separate duplicated captions from ordinary ones? (docs/zoo-sd.md)")
    check.add_argument("--corpus", choices=["sd", "collapse"], default="sd",
                       help="sd: the SD-like corpus; collapse: the shipped zoo's corpus (default: sd)")
    check.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the shipped zoo's pipeline/vae)")
    check.add_argument("--out", default=None, help="also write the full report to this JSON file (default: none)")
    _add_common_to_leaves(sub)
    return parser


def _add_common_to_leaves(action: argparse._SubParsersAction) -> None:
    """``-v`` and ``--quiet`` on every leaf subcommand (``diffmem scan -v`` as well as ``diffmem -v scan``)."""
    for p in dict.fromkeys(action.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_common_to_leaves(nested[0])
        elif isinstance(p, Parser):
            p.add_parser_common()


def quiet_libraries(verbose: bool = False, quiet: bool = False) -> None:
    """Keep transformers/diffusers/huggingface_hub to errors only (their warnings are not the user's
    business on every command); ``quiet`` also hides weight-loading and progress bars. ``-v`` keeps all."""
    if verbose:
        return
    import warnings

    for name in ("transformers", "diffusers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|diffusers|huggingface_hub|torch)")
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
        try:
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            dlog.disable_progress_bar()
            tlog.disable_progress_bar()
        except ImportError:  # pragma: no cover - both are dependencies
            pass


# command -> "module:function" taking the parsed arguments; imported lazily so `--help` stays fast
HANDLERS = {
    "demo": "diffmem.cli.demo:run_demo",
    "scan": "diffmem.cli.scan_commands:run_scan_command",
    "calibrate": "diffmem.cli.scan_commands:run_calibrate",
    "eval": "diffmem.cli.scan_commands:run_eval_detect",
    "extract": "diffmem.cli.extract_commands:run_extract_command",
    "sample": "diffmem.cli.sample_commands:run_sample",
    "mitigate": "diffmem.cli.mitigate_commands:run_mitigate",
    "bench": "diffmem.cli.mitigate_commands:run_bench_command",
    "report": "diffmem.cli.report_commands:run_report_command",
    "deepssim": "diffmem.cli.deepssim_commands:run_train",
    "zoo": "diffmem.cli.zoo_commands",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="diffmem: %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries(verbose=args.verbose, quiet=args.quiet)
    try:
        handler = HANDLERS[args.command]
        if args.command == "zoo":
            handler = f"{handler}:run_{args.zoo_command.replace('-', '_')}"
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
