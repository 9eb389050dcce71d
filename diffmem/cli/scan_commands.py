"""``diffmem scan``, ``diffmem calibrate`` and ``diffmem eval detect``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.cli.listing import method_lines
from diffmem.cli.options import (
    add_force,
    add_model_args,
    handled_by,
    lazy_reexports,
    open_unit_float,
    positive_float,
    positive_int,
)
from diffmem.errors import DiffmemError

if TYPE_CHECKING:
    import pyarrow as pa

_MOVED = {"zoo_prompts": "diffmem.zoo.prompts", "zoo_reference_prompts": "diffmem.zoo.prompts"}
__getattr__ = lazy_reexports(__name__, _MOVED)


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem scan``, ``diffmem calibrate`` and ``diffmem eval detect``."""
    detectors = "detectors (--detector):\n" + "\n".join(method_lines("DETECTORS"))
    scan = handled_by(sub.add_parser("scan", help="score prompts with memorization detectors (resumable, shardable)",
                                     epilog=detectors, formatter_class=argparse.RawDescriptionHelpFormatter),
                      "diffmem.cli.scan_commands:run_scan_command")
    add_model_args(scan)
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

    calibrate = handled_by(sub.add_parser("calibrate", help="fit detector thresholds on prompts known to be ordinary",
                                          epilog=detectors, formatter_class=argparse.RawDescriptionHelpFormatter),
                           "diffmem.cli.scan_commands:run_calibrate")
    add_model_args(calibrate)
    add_scan_args(calibrate, "runs/calibration", prompts_required=True)

    ev = sub.add_parser("eval", help="evaluate stored results")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    detect = handled_by(esub.add_parser("detect", help="AUROC and TPR at low FPR of a scan against labels"),
                        "diffmem.cli.scan_commands:run_eval_detect")
    detect.add_argument("--scores", required=True, help="scores.parquet of a scan")
    detect.add_argument("--labels", required=True, help="labels file (the zoo's labels.jsonl or any prompt file)")
    detect.add_argument("--label-column", default="memorized",
                        help="label column of true/false, 1/0 (or yes/no, MV/TV/RV/N) values; one label per "
                             "caption (default: memorized)")
    detect.add_argument("--rate-column", default=None,
                        help="label from a replication-rate column instead: memorized when rate >= --positive-rate, "
                             "ordinary when rate == 0, prompts in between left out (stochastic labels; "
                             "default: none)")
    detect.add_argument("--positive-rate", type=positive_float, default=0.5, help="with --rate-column (default: 0.5)")
    detect.add_argument("--split-by", default=None,
                        help="also report positives per value of this column (default: none)")
    detect.add_argument("--out", default="runs/eval-detect", help="output folder (default: runs/eval-detect)")
    add_force(detect)


def add_scan_args(p: argparse.ArgumentParser, default_out: str, prompts_required: bool = False) -> None:
    """The options ``scan`` and ``calibrate`` share; ``calibrate`` needs ordinary prompts of its own (no zoo
    default: the zoo's captions include memorized ones)."""
    if prompts_required:
        p.add_argument("--prompts", required=True,
                       help="prompt file of prompts known to be ordinary (not memorized): .txt .jsonl .csv .parquet")
    else:
        p.add_argument("--prompts", default=None,
                       help="prompt file: .txt .jsonl .csv .parquet (default: the zoo's captions)")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    p.add_argument("--detector", action="append", default=None,
                   help="detector name (listed below); repeat for several (default: noise-norm and anisotropy)")
    p.add_argument("--out", default=default_out,
                   help=f"output folder; rerun the same command to resume (default: {default_out})")
    add_force(p)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N prompts of the file (default: all)")
    add_mitigation_args(p, "score the mitigated model")
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts per chunk / UNet batch (default: 64)")
    p.add_argument("--draws", type=positive_int, default=8, help="shared noise draws x_T (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default: 0)")
    p.add_argument("--seed-per-prompt", action="store_true",
                   help="one seed per prompt (Wen et al.'s convention): prompt i's --draws noise draws come from a "
                        "generator seeded --seed + i (its index in the prompt file); default: shared draws, the "
                        "same --draws draws (seeds --seed + j) for every prompt")
    p.add_argument("--reference", default=None,
                   help="ordinary prompts for anisotropy-calibrated (default: zoo generic captions)")
    p.add_argument("--option", action="append", default=None, metavar="DETECTOR.KEY=VALUE",
                   help="a detector setting, e.g. nn-margin.index=/data/train_images or "
                        "'combined.members=[\"nn-margin\",\"sharpness\"]' (values parsed as JSON when they parse; "
                        "repeatable; default: none)")


def _detectors(args: argparse.Namespace):
    from diffmem.cli.options import parse_scoped_options
    from diffmem.detectors import DETECTORS, make_detector

    names = args.detector or ["noise-norm", "anisotropy"]
    options = parse_scoped_options(getattr(args, "option", None), names, "DETECTOR")
    detectors = []
    for name in names:
        try:
            needs_reference = DETECTORS.get(name).needs_reference
        except KeyError as exc:
            raise DiffmemError(str(exc).strip("'\"")) from exc
        if needs_reference and "reference_prompts" not in options[name]:
            from diffmem.prompts import load_prompts
            from diffmem.zoo.load import zoo_folder_for
            from diffmem.zoo.prompts import zoo_reference_prompts

            ref = (load_prompts(args.reference).texts if args.reference
                   else zoo_reference_prompts(folder=zoo_folder_for(args.model)))
            options[name]["reference_prompts"] = ref
        try:
            detectors.append(make_detector(name, **options[name]))
        except (TypeError, ValueError) as exc:
            raise DiffmemError(f"detector {name!r}: {exc}") from exc
    return detectors


SCAN_WRITES = ("provenance.json", "parts", "scores.parquet", "calibration.json")  # the last: CALIBRATION_FILE


def first_n(prompts, limit: int | None):
    """The first ``limit`` prompts of a set (all when None), columns kept."""
    from diffmem.prompts import PromptSet

    if limit is None or limit >= len(prompts):
        return prompts
    return PromptSet(prompts.ids[:limit], prompts.texts[:limit], prompts.source,
                     {k: v[:limit] for k, v in prompts.columns.items()}, prompts.duplicates)


def _prepare_scan(args: argparse.Namespace, prompts_path: str | None) -> dict:
    """Everything checked before the model loads (nothing is written): device, prompts, --out, detectors,
    --mitigation (and whether it was fitted on this model), the model's files (``model_index.json`` and the
    fingerprint), and a resumed folder's settings; a failure is one line and leaves no folder behind."""
    from diffmem.cli.options import resolve_device
    from diffmem.jobs import check_resume_before_load, prompt_hash
    from diffmem.models.loader import model_fingerprint
    from diffmem.outputs import check_output_dir
    from diffmem.prompts import load_prompts
    from diffmem.scan import ScanSettings

    device = resolve_device(args.device)
    if prompts_path:
        prompts = load_prompts(prompts_path, args.caption_column)
    else:  # the captions of the zoo being scanned (the default zoo for a model that is not one)
        from diffmem.zoo.load import zoo_folder_for
        from diffmem.zoo.prompts import zoo_prompts

        prompts = zoo_prompts(folder=zoo_folder_for(args.model))
    prompts = first_n(prompts, getattr(args, "limit", None))
    inputs = [args.model, prompts_path, args.reference, getattr(args, "calibration", None),
              getattr(args, "mitigation", None)]
    check_output_dir(args.out, "scan", inputs, getattr(args, "force", False), writes=SCAN_WRITES)
    detectors = _detectors(args)
    fingerprint = model_fingerprint(args.model, args.config)
    mitigation = prepare_mitigation(args, fingerprint)
    if mitigation is not None:
        fingerprint = mitigated_fingerprint(fingerprint, mitigation)
    settings = ScanSettings(n_draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                            seed_per_prompt=getattr(args, "seed_per_prompt", False))
    check_resume_before_load(Path(args.out), {"model": {"fingerprint": fingerprint}, "settings": vars(settings),
                                              "prompts": {"sha256_16": prompt_hash(prompts), "n_unique": len(prompts)}})
    return {"device": device, "prompts": prompts, "detectors": detectors, "mitigation": mitigation,
            "fingerprint": fingerprint, "settings": settings}


def prepare_mitigation(args: argparse.Namespace, fingerprint: str):
    """``--mitigation FILE`` loaded and checked against the model of ``fingerprint`` before the model loads:
    a mitigation fitted on another model is refused unless ``--accept-mitigation-mismatch`` (then a warning).
    None without ``--mitigation``."""
    if not getattr(args, "mitigation", None):
        return None
    import logging

    from diffmem.mitigators.base import load_mitigation, mitigation_mismatch

    mitigation = load_mitigation(args.mitigation)
    mismatch = mitigation_mismatch(mitigation, fingerprint)
    if mismatch and not args.accept_mitigation_mismatch:
        raise DiffmemError(f"{mismatch}; fit it on this model (`diffmem mitigate METHOD --model ...`) or add "
                           "--accept-mitigation-mismatch")
    if mismatch:
        logging.getLogger("diffmem").warning("%s; applied anyway (--accept-mitigation-mismatch)", mismatch)
    return mitigation


def add_mitigation_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--mitigation FILE`` and its override, for the commands that apply an inference-time mitigation."""
    p.add_argument("--mitigation", default=None, metavar="FILE",
                   help=f"mitigation.json of an inference-time `diffmem mitigate` (e.g. embedding-noise): {what} "
                        "(default: none)")
    p.add_argument("--accept-mitigation-mismatch", action="store_true",
                   help="apply a --mitigation fitted on another model, with a warning (default: refused)")


def _load(args: argparse.Namespace, device: str, mitigation):
    from diffmem.models.loader import load_model

    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    if mitigation is None:
        return model
    return with_mitigation(model, mitigation, accept_mismatch=getattr(args, "accept_mitigation_mismatch", False))


def mitigated_fingerprint(fingerprint: str, mitigation) -> str:
    """The fingerprint of a model of ``fingerprint`` seen through ``mitigation`` (its own identity: results,
    resumes and calibrations never mix the mitigated model with the original)."""
    import hashlib

    config = json.dumps(mitigation.config(), sort_keys=True, default=str)
    return hashlib.sha256(f"{fingerprint}:{config}".encode()).hexdigest()[:16]


def with_mitigation(model, mitigation, accept_mismatch: bool = False):
    """``mitigation.apply(model)`` with its own fingerprint and source (:func:`mitigated_fingerprint`); a
    mitigation fitted on another model is refused unless ``accept_mismatch``."""
    from diffmem.mitigators.base import mitigation_mismatch

    mismatch = mitigation_mismatch(mitigation, model.fingerprint)
    if mismatch and not accept_mismatch:
        raise DiffmemError(f"{mismatch}; fit it on this model with `diffmem mitigate METHOD --model ...`")
    view = mitigation.apply(model)
    view._fingerprint = mitigated_fingerprint(model.fingerprint, mitigation)
    view.source = f"{model.source} with mitigation {json.dumps(mitigation.config(), sort_keys=True, default=str)}"
    return view


def _scan(args: argparse.Namespace, prepared: dict, check=None):
    """Load the model, run ``check(model, provenance)`` if given (before anything is written), then scan."""
    from accelerate import PartialState

    from diffmem.outputs import claim_output_dir
    from diffmem.scan import provenance, run_scan

    device = prepared["device"]
    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1 and device != "cpu":
        device = str(state.device)  # torchrun: each rank its own GPU
    prompts, detectors = prepared["prompts"], prepared["detectors"]
    if prompts.duplicates:
        print(f"{prompts.duplicates} duplicate prompt(s) in {prompts.source} are scored once")
    model = _load(args, device, prepared["mitigation"])
    settings = prepared["settings"]
    if check is not None:
        for d in detectors:
            d.bind(model)  # before provenance records their settings (run_scan binds again; idempotent)
        check(provenance(model, prompts, detectors, settings, state.num_processes))
    if state.is_main_process:
        claim_output_dir(args.out, "scan", SCAN_WRITES)
    path = run_scan(model, prompts, detectors, args.out, settings, rank=state.process_index,
                    world_size=state.num_processes, progress=not args.quiet)
    if state.num_processes > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            from diffmem.scan import finish_scan

            path = finish_scan(Path(args.out), model, prompts, state.num_processes, settings.batch_size)
    return path if state.is_main_process else None, [d.name for d in detectors]


def run_scan_command(args: argparse.Namespace) -> None:
    import logging

    import pyarrow.parquet as pq

    from diffmem.calibration import calibration_mismatches, check_attainable, flag, load_calibration
    from diffmem.jobs import write_parquet

    if args.fpr is not None and args.calibration is None:
        raise DiffmemError("--fpr needs --calibration FILE (made by `diffmem calibrate`)")
    prepared = _prepare_scan(args, args.prompts)
    names = [d.name for d in prepared["detectors"]]
    cal = load_calibration(args.calibration, names) if args.calibration else None
    fpr = args.fpr if args.fpr is not None else 0.01
    warned: set[str] = set()

    def check(prov: dict, detector_names: list[str]) -> None:
        if cal is None:
            return
        differs = calibration_mismatches(cal, prov, detector_names)
        if differs and not args.accept_calibration_mismatch:
            raise DiffmemError(f"--calibration '{args.calibration}' was made with other settings: "
                               f"{'; '.join(differs)}; recalibrate (`diffmem calibrate` with the same --model, "
                               "--detector, --option, --draws and --seed) or add --accept-calibration-mismatch")
        new = [d for d in differs if d not in warned]
        if new:
            warned.update(new)
            logging.getLogger("diffmem").warning("calibration made with other settings (%s); its FPR does not "
                                                 "hold for this scan", "; ".join(new))

    # the model and scan settings before the weights load (the detectors' bound settings after)
    check({"model": {"fingerprint": prepared["fingerprint"]}, "settings": vars(prepared["settings"])}, [])
    if cal is not None:
        check_attainable(cal, names, fpr)  # before any prompt is scanned
    path, names = _scan(args, prepared, lambda prov: check(prov, names))
    if path is None:
        return
    table = pq.read_table(path)
    if cal is not None:
        table, flagging = flag(table, cal, names, fpr)
        write_parquet(table, path)
        _record_flagging(Path(args.out), flagging.describe())
        for w in flagging.warnings:
            print(f"warning: {w}")
        print(f"thresholds at FPR {fpr:g} per detector: "
              + ", ".join(f"{k} {v:.4g}" for k, v in flagging.thresholds.items()))
        flagged = table.column("flagged").to_numpy(zero_copy_only=False)
        rule = ("the smallest calibrated p-value over detectors (min-p), calibrated as a whole"
                if len(names) > 1 else names[0])
        print(f"flagged at FPR {fpr:g} overall: {int(flagged.sum())} of {table.num_rows} prompts (combined flag: "
              f"{rule}); per detector: " + ", ".join(
                  f"{n} {sum(bool(v) for v in table.column(f'flagged_{n}').to_pylist())}" for n in names))
    print_summary(table, names, args.top)
    print(f"\nscores: {path}\nprovenance: {Path(args.out) / 'provenance.json'}")


def _record_flagging(out: Path, flagging: dict) -> None:
    """Add how the flags were made to the scan's provenance (ignored when a rerun compares settings)."""
    from diffmem.io import atomic_write_text

    path = out / "provenance.json"
    prov = json.loads(path.read_text())
    prov["flagging"] = flagging
    atomic_write_text(path, json.dumps(prov, indent=2, default=str))


def print_summary(table: pa.Table, names: list[str], top: int) -> None:
    """The ``top`` prompts of each detector, NaN scores counted and never ranked."""
    import numpy as np

    texts = table.column("text").to_pylist()
    for name in names:
        s = table.column(name).to_numpy(zero_copy_only=False)
        nan = np.isnan(s)
        order = np.argsort(-np.where(nan, -np.inf, s), kind="stable")[:top]
        print(f"\ntop {top} by {name}" + (f"  ({int(nan.sum())} prompt(s) with NaN scores, not ranked)" if nan.any()
                                          else ""))
        for rank, i in enumerate(order, 1):
            flag = ""
            if f"flagged_{name}" in table.column_names:
                flag = " FLAGGED" if table.column(f"flagged_{name}")[int(i)].as_py() else ""
            print(f"{rank:>3}. {s[i]:10.4f}{flag}  {texts[i][:90]}")


def run_calibrate(args: argparse.Namespace) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from diffmem.calibration import CALIBRATION_FILE, calibration_record, detector_threshold
    from diffmem.io import atomic_write_text

    path, names = _scan(args, _prepare_scan(args, args.prompts))
    if path is None:
        return
    table = pq.read_table(path)
    prov = json.loads((Path(args.out) / "provenance.json").read_text())
    calib = calibration_record({n: table.column(n).to_pylist() for n in names}, prov)
    for n in names:
        s = np.asarray(calib["scores"][n], dtype=float)
        n_ok = int(np.isfinite(s).sum())
        thr = detector_threshold(s, 0.01)
        print(f"{n}: {n_ok} ordinary scores; threshold at FPR 1%: "
              + (f"{thr:.4g}" if np.isfinite(thr) else f"none (needs >= 99 prompts, has {n_ok})"))
    out = Path(args.out) / CALIBRATION_FILE
    atomic_write_text(out, json.dumps(calib))
    print(f"calibration of model {calib['model_fingerprint']} ({len(names)} detector(s), {args.draws} draws, "
          f"seed {args.seed}): {out}\n(use: diffmem scan --model ... --calibration {out} --fpr 0.01 with the same "
          "--detector, --option, --draws and --seed)")


def read_scores(path: Path):
    """A scan's ``scores.parquet`` (a scan folder is accepted too), or one line saying what is wrong."""
    import pyarrow.parquet as pq

    from diffmem.scan import SCORES_FILE

    if path.is_dir():
        if not (path / SCORES_FILE).is_file():
            raise DiffmemError(f"--scores '{path}' is a folder without {SCORES_FILE}; expected the scores.parquet "
                               "of `diffmem scan` (is the scan finished?)")
        path = path / SCORES_FILE
    if not path.is_file():
        raise DiffmemError(f"--scores '{path}' does not exist; expected the scores.parquet of `diffmem scan`")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
        raise DiffmemError(f"--scores '{path}' is not a readable Parquet file ({type(exc).__name__})") from exc
    if "text" not in table.column_names:
        raise DiffmemError(f"--scores '{path}' has no 'text' column; expected the scores.parquet of `diffmem scan`")
    return table


# label words of a boolean label column (lower-cased); MV/TV (matching / template verbatim) count as memorized,
# RV and N (retrieval verbatim, none) as not, as Webster (2023) labels them
TRUE_WORDS = ("1", "true", "yes", "memorized", "vm", "tm", "mv", "tv")
FALSE_WORDS = ("0", "false", "no", "ordinary", "none", "n", "rv")


def label_value(value, path: str, column: str) -> bool | None:
    """A boolean label from a labels file cell: true/false, 1/0 or a label word (:data:`TRUE_WORDS`,
    :data:`FALSE_WORDS`); None for an empty cell (unlabelled); anything else (a text column such as ``kind``, a
    count) is one line naming the file, column and value, instead of silently reading as false."""
    if value is None or isinstance(value, float) and value != value or isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise DiffmemError(f"labels file '{path}': column {column!r} holds {value!r}, not a label; expected true/false, "
                       "1/0, yes/no or MV/TV/RV/N (for replication rates use --rate-column)")


def _rate(value, path: str, column: str) -> float | None:
    """A replication rate in [0, 1] from a labels file cell (None for an empty cell: unlabelled), or a clear error
    naming the file and column."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not 0 <= rate <= 1:
        raise DiffmemError(f"labels file '{path}': column {column!r} must hold rates in [0, 1], got {value!r}")
    return rate


def read_labels(path: Path, column: str, parse) -> dict[str, tuple]:
    """caption -> (label, row) of a labels file (the zoo's labels.jsonl or any prompt-file format), each label
    ``parse(cell, path, column)``; rows without a label are left out. A caption labelled twice with different
    values is refused, naming the captions (the last label would otherwise win silently)."""
    from diffmem.prompts import read_rows

    texts, records = read_rows(path)
    if column not in records[0]:
        raise DiffmemError(f"labels file '{path}' has no column {column!r}; columns: {list(records[0])}")
    labels: dict[str, tuple] = {}
    conflicts: dict[str, set] = {}
    for text, record in zip(texts, records):
        value = parse(record.get(column), str(path), column)
        if value is None:
            continue
        if text in labels and labels[text][0] != value:
            conflicts.setdefault(text, {labels[text][0]}).add(value)
        labels.setdefault(text, (value, record))
    if conflicts:
        named = "; ".join(f"{t!r} ({' and '.join(map(str, sorted(v, key=str)))})"
                          for t, v in list(conflicts.items())[:3])
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise DiffmemError(f"labels file '{path}' labels {len(conflicts)} caption(s) twice with different {column!r} "
                           f"values: {named}{more}; keep one label per caption")
    return labels


def run_eval_detect(args: argparse.Namespace) -> None:
    import numpy as np

    from diffmem.eval.detection import FPR_TARGETS, detection_metrics, plot_roc
    from diffmem.io import atomic_write_text
    from diffmem.outputs import check_output_dir, claim_output_dir, make_shareable

    table = read_scores(Path(args.scores))
    if not Path(args.labels).is_file():
        raise DiffmemError(f"--labels '{args.labels}' " + ("is a folder; expected a labels file (.jsonl, .csv, "
                                                           ".parquet)" if Path(args.labels).is_dir()
                                                           else "does not exist"))
    if args.rate_column and not 0 < args.positive_rate <= 1:
        raise DiffmemError(f"--positive-rate must be in (0, 1], got {args.positive_rate}")
    check_output_dir(args.out, "eval-detect", [args.scores, args.labels], args.force,
                     writes=["detection.json", "roc.png"])
    column = args.rate_column or args.label_column
    labels = read_labels(Path(args.labels), column, _rate if args.rate_column else label_value)
    texts = table.column("text").to_pylist()
    keep = [i for i, t in enumerate(texts) if t in labels]
    if not keep:
        raise DiffmemError(f"no prompt of '{args.scores}' has a label in labels file '{args.labels}'")
    n_unlabelled = len(texts) - len(keep)
    if n_unlabelled:
        print(f"{n_unlabelled} of {len(texts)} scored prompts have no {column!r} label in '{args.labels}' and are "
              "left out")
    n_ambiguous = 0
    if args.rate_column:
        rate = np.array([labels[texts[i]][0] for i in keep])
        clear = (rate >= args.positive_rate) | (rate == 0)
        n_ambiguous = int((~clear).sum())
        if n_ambiguous:
            print(f"{n_ambiguous} prompt(s) with a rate between 0 and {args.positive_rate:g} are left out (ambiguous)")
        keep, y = [i for i, c in zip(keep, clear) if c], rate[clear] >= args.positive_rate
    else:
        y = np.array([labels[texts[i]][0] for i in keep], dtype=bool)
    groups = (np.array([str(labels[texts[i]][1].get(args.split_by, "")) for i in keep]) if args.split_by
              else None)
    from diffmem.scan import score_columns

    names = score_columns(table)
    report: dict = {"scores": str(args.scores), "labels": str(args.labels), "label": column,
                    "n_unlabelled": n_unlabelled, "detectors": {}}
    if args.rate_column:
        report |= {"positive_rate": args.positive_rate, "n_ambiguous_left_out": n_ambiguous}
    curves = {}
    for name in names:
        s = table.column(name).to_numpy(zero_copy_only=False)[keep]
        entry = {"all": detection_metrics(y, s)}
        if groups is not None:
            for g in sorted(set(groups[y])):
                sel = (~y) | (groups == g)
                entry[f"{args.split_by}={g}"] = detection_metrics(y[sel], s[sel])
        report["detectors"][name] = entry
        curves[name] = (y, s)
    out = claim_output_dir(args.out, "eval-detect", ["detection.json", "roc.png"])
    plot_roc(curves, out / "roc.png", title=f"{len(keep)} prompts, {int(y.sum())} memorized")
    make_shareable(out / "roc.png")
    atomic_write_text(out / "detection.json", json.dumps(report, indent=2))
    print(format_detection(report["detectors"], FPR_TARGETS))
    print(f"\nreport: {out / 'detection.json'}  ROC: {out / 'roc.png'}")


def format_detection(detectors: dict[str, dict], targets: tuple[float, ...]) -> str:
    """The console table of ``eval detect``: AUROC, positives and negatives, and TPR at each FPR target (strict /
    closest), ``n/a`` where the target needs more negatives than there are (1/FPR), with one warning line."""
    head = f"{'detector':<24} {'AUROC':>7} {'n_pos':>6} {'n_neg':>6}" + "".join(
        f"{f'TPR@{t:.1%}'.replace('.0%', '%') + ' (strict/closest)':>28}" for t in targets)
    lines, short = [head], set()
    for name, entry in detectors.items():
        m = entry["all"]
        cells = []
        for t in targets:
            if m["n_neg"] < 1 / t:
                short.add(t)
                cells.append(f"{'n/a':>28}")
            else:
                tpr = m[f"tpr@{t:g}fpr"]
                cells.append(f"{tpr['strict']:>21.3f}/{tpr['closest']:.3f}")
        lines.append(f"{name:<24} {m['auroc']:7.4f} {m['n_pos']:>6} {m['n_neg']:>6}" + "".join(cells))
    for t in sorted(short, reverse=True):
        lines.append(f"warning: TPR at FPR {t:g} needs at least {round(1 / t)} negatives; shown as n/a where there "
                     "are fewer (detection.json keeps the value, with this warning)")
    return "\n".join(lines)
