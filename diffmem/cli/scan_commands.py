"""``diffmem scan``, ``diffmem calibrate`` and ``diffmem eval detect``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.calibration import CALIBRATION_FILE
from diffmem.errors import DiffmemError
from diffmem.io import atomic_write_text
from diffmem.jobs import write_parquet
from diffmem.zoo.prompts import zoo_prompts, zoo_reference_prompts  # noqa: F401  (re-exported for the CLI)


def add_scan_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--prompts", default=None,
                   help="prompt file: .txt .jsonl .csv .parquet (default: the zoo's captions)")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    p.add_argument("--detector", action="append", default=None,
                   help="detector name; repeat for several (default: noise-norm and anisotropy)")
    from diffmem.cli.main import add_force, positive_int

    p.add_argument("--out", default=default_out,
                   help=f"output folder; rerun the same command to resume (default: {default_out})")
    add_force(p)
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N prompts of the file (default: all)")
    p.add_argument("--mitigation", default=None, metavar="FILE",
                   help="mitigation.json of an inference-time `diffmem mitigate` (e.g. embedding-noise): "
                        "score the mitigated model (default: none)")
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

            ref = (load_prompts(args.reference).texts if args.reference
                   else zoo_reference_prompts(folder=zoo_folder_for(args.model)))
            options[name]["reference_prompts"] = ref
        try:
            detectors.append(make_detector(name, **options[name]))
        except (TypeError, ValueError) as exc:
            raise DiffmemError(f"detector {name!r}: {exc}") from exc
    return detectors


SCAN_WRITES = ("provenance.json", "parts", "scores.parquet", CALIBRATION_FILE)


def first_n(prompts, limit: int | None):
    """The first ``limit`` prompts of a set (all when None), columns kept."""
    from diffmem.prompts import PromptSet

    if limit is None or limit >= len(prompts):
        return prompts
    return PromptSet(prompts.ids[:limit], prompts.texts[:limit], prompts.source,
                     {k: v[:limit] for k, v in prompts.columns.items()}, prompts.duplicates)


def _prepare_scan(args: argparse.Namespace, prompts_path: str | None) -> dict:
    """Everything checked before the model loads (nothing is written): device, prompts, --out, detectors,
    --mitigation; a failure is one line and leaves no folder behind."""
    from diffmem.cli.options import resolve_device
    from diffmem.outputs import check_output_dir
    from diffmem.prompts import load_prompts

    device = resolve_device(args.device)
    if prompts_path:
        prompts = load_prompts(prompts_path, args.caption_column)
    else:  # the captions of the zoo being scanned (the default zoo for a model that is not one)
        from diffmem.zoo.load import zoo_folder_for

        prompts = zoo_prompts(folder=zoo_folder_for(args.model))
    prompts = first_n(prompts, getattr(args, "limit", None))
    inputs = [args.model, prompts_path, args.reference, getattr(args, "calibration", None),
              getattr(args, "mitigation", None)]
    check_output_dir(args.out, "scan", inputs, getattr(args, "force", False), writes=SCAN_WRITES)
    mitigation = None
    if getattr(args, "mitigation", None):
        from diffmem.mitigators.base import load_mitigation

        mitigation = load_mitigation(args.mitigation)
    return {"device": device, "prompts": prompts, "detectors": _detectors(args), "mitigation": mitigation}


def _load(args: argparse.Namespace, device: str, mitigation):
    from diffmem.models.loader import load_model

    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    return with_mitigation(model, mitigation) if mitigation is not None else model


def with_mitigation(model, mitigation):
    """``mitigation.apply(model)`` with its own fingerprint and source, so results, resumes and
    calibrations never mix the mitigated model with the original."""
    import hashlib

    view = mitigation.apply(model)
    config = json.dumps(mitigation.config(), sort_keys=True, default=str)
    view._fingerprint = hashlib.sha256(f"{model.fingerprint}:{config}".encode()).hexdigest()[:16]
    view.source = f"{model.source} with mitigation {config}"
    return view


def _scan(args: argparse.Namespace, prepared: dict, check=None):
    """Load the model, run ``check(model, provenance)`` if given (before anything is written), then scan."""
    from accelerate import PartialState

    from diffmem.outputs import claim_output_dir
    from diffmem.scan import ScanSettings, provenance, run_scan

    device = prepared["device"]
    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1 and device != "cpu":
        device = str(state.device)  # torchrun: each rank its own GPU
    prompts, detectors = prepared["prompts"], prepared["detectors"]
    if prompts.duplicates:
        print(f"{prompts.duplicates} duplicate prompt(s) in {prompts.source} are scored once")
    model = _load(args, device, prepared["mitigation"])
    settings = ScanSettings(n_draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                            seed_per_prompt=getattr(args, "seed_per_prompt", False))
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

    from diffmem.calibration import calibration_mismatches, check_attainable, flag, load_calibration

    if args.fpr is not None and args.calibration is None:
        raise DiffmemError("--fpr needs --calibration FILE (made by `diffmem calibrate`)")
    prepared = _prepare_scan(args, args.prompts)
    names = [d.name for d in prepared["detectors"]]
    cal = load_calibration(args.calibration, names) if args.calibration else None
    fpr = args.fpr if args.fpr is not None else 0.01
    if cal is not None:
        check_attainable(cal, names, fpr)  # before any prompt is scanned

    def check(prov: dict) -> None:
        if cal is None:
            return
        differs = calibration_mismatches(cal, prov, names)
        if differs and not args.accept_calibration_mismatch:
            raise DiffmemError(f"--calibration '{args.calibration}' was made with other settings: "
                               f"{'; '.join(differs)}; recalibrate (`diffmem calibrate` with the same --model, "
                               "--detector, --option, --draws and --seed) or add --accept-calibration-mismatch")
        if differs:
            logging.getLogger("diffmem").warning("calibration made with other settings (%s); its FPR does not "
                                                 "hold for this scan", "; ".join(differs))

    path, names = _scan(args, prepared, check)
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
    path = out / "provenance.json"
    prov = json.loads(path.read_text())
    prov["flagging"] = flagging
    atomic_write_text(path, json.dumps(prov, indent=2, default=str))


def print_summary(table: pa.Table, names: list[str], top: int) -> None:
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
    from diffmem.calibration import calibration_record, detector_threshold

    if args.prompts is None:
        raise DiffmemError("calibrate needs --prompts FILE of prompts known to be ordinary (not memorized)")
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


def read_labels(path: Path, label_column: str) -> dict[str, dict]:
    """caption -> row of a labels file (the zoo's labels.jsonl or any prompt-file format with a label column)."""
    from diffmem.prompts import read_rows

    texts, records = read_rows(path)
    if label_column not in records[0]:
        raise DiffmemError(f"labels file '{path}' has no column {label_column!r}; columns: {list(records[0])}")
    return dict(zip(texts, records))


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "memorized", "vm", "tm", "mv", "tv")
    return bool(v)


def _rate(value, path: str, column: str) -> float:
    """A replication rate in [0, 1] from a labels file cell, or a clear error naming the file and column."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not 0 <= rate <= 1:
        raise DiffmemError(f"labels file '{path}': column {column!r} must hold rates in [0, 1], got {value!r}")
    return rate


def run_eval_detect(args: argparse.Namespace) -> None:
    from diffmem.eval.detection import detection_metrics, plot_roc
    from diffmem.outputs import check_output_dir, claim_output_dir, make_shareable

    table = read_scores(Path(args.scores))
    if not Path(args.labels).is_file():
        raise DiffmemError(f"--labels '{args.labels}' " + ("is a folder; expected a labels file (.jsonl, .csv, "
                                                           ".parquet)" if Path(args.labels).is_dir()
                                                           else "does not exist"))
    check_output_dir(args.out, "eval-detect", [args.scores, args.labels], args.force,
                     writes=["detection.json", "roc.png"])
    column = args.rate_column or args.label_column
    labels = read_labels(Path(args.labels), column)
    texts = table.column("text").to_pylist()
    keep = [i for i, t in enumerate(texts) if t in labels]
    if not keep:
        raise DiffmemError(f"no prompt of '{args.scores}' appears in labels file '{args.labels}'")
    n_ambiguous = 0
    if args.rate_column:
        if not 0 < args.positive_rate <= 1:
            raise DiffmemError(f"--positive-rate must be in (0, 1], got {args.positive_rate}")
        rate = np.array([_rate(labels[texts[i]][column], args.labels, column) for i in keep])
        clear = (rate >= args.positive_rate) | (rate == 0)
        n_ambiguous = int((~clear).sum())
        keep, y = [i for i, c in zip(keep, clear) if c], rate[clear] >= args.positive_rate
    else:
        y = np.array([_truthy(labels[texts[i]][column]) for i in keep])
    groups = np.array([str(labels[texts[i]].get(args.split_by, "")) for i in keep]) if args.split_by else None
    from diffmem.scan import score_columns

    names = score_columns(table)
    report: dict = {"scores": str(args.scores), "labels": str(args.labels), "label": column,
                    "n_unlabelled": len(texts) - len(keep) - n_ambiguous, "detectors": {}}
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
    print(f"{'detector':<24} {'AUROC':>7} {'TPR@1% (strict/closest)':>24} {'TPR@0.1%':>18}")
    for name, entry in report["detectors"].items():
        m = entry["all"]
        t1, t01 = m["tpr@0.01fpr"], m["tpr@0.001fpr"]
        print(f"{name:<24} {m['auroc']:7.4f} {t1['strict']:11.3f}/{t1['closest']:.3f} "
              f"{t01['strict']:11.3f}/{t01['closest']:.3f}")
    print(f"\nreport: {out / 'detection.json'}  ROC: {out / 'roc.png'}")
