"""Benchmark: every detector on a zoo — AUROC, TPR@1%/0.1% FPR (both estimators), UNet calls per prompt.

``--model`` picks the zoo (``zoo``, the default, = the default zoo ``zoo:sd``; ``zoo:collapse``; or any model
folder with ``--labels``), ``--labels`` the labels file (default: the zoo's ``labels.jsonl``; columns ``caption,
kind, memorized, replication, family, memorized_seeds``). Positives: captions the labels call memorized (found
by extraction).
Negatives: the other captions (ordinary captions, held-out generic, never-trained look-alikes,
non-memorized signature items, once-seen titles), at most ``--max-per-kind`` evenly spaced captions of
each kind, and never the ordinary reference captions that ``anisotropy-calibrated`` and ``combined``
standardise on.

``results`` in the JSON are measured on every prompt (as before; the collapse zoo's figures are
unchanged). ``heldout`` is the protocol of issue #11 (:mod:`diffmem.eval.protocol`): per split seed
(``--split-seeds``), a dev / test split of the captions stratified by kind and label; every choice by
label (a detector's draw count or nn-margin's step, a combination's members, the flagging threshold,
the best noise-step detector) is made on dev and every figure is reported on test, with the test
negatives also taken apart (ordinary captions, once-seen titles); whether each detector meets the
target (AUROC >= 0.99 and TPR@1%FPR >= 0.9 with <= 32 UNet calls and no training images); and the
spread over split seeds. Resplitting reuses the scores: no model call.

Each group of detectors scans into its own folder under ``--work``, named by a digest of the
detectors' settings and the draws: a rerun reuses every finished scan whose settings are unchanged
and resumes unfinished ones, so changing one detector rescans only that detector. The wall-clock time
of every scan session (and of each combination's reference pass) is kept in ``--work/state.json``;
a session that was killed is counted up to its last written part. The JSON reports the sum over
sessions, so a resumed run never overwrites a timing with the resume's own few seconds.

Writes ``--out`` (JSON), the ROC plot beside it (``.png``) and every prompt's scores
(``<out stem>_scores.parquet``, zstd): ``diffmem eval detect --scores benchmarks/results/detection_scores.parquet
--labels diffmem/zoo/checkpoint/labels.jsonl`` regenerates the AUROC and TPR columns.

    .venv/bin/python benchmarks/detection.py --model zoo:collapse --draws 8 32 --max-per-kind 1000  # detection.json
    .venv/bin/python benchmarks/detection.py --model zoo:sd --draws 8 32 --max-per-kind 1000  # detection_sd.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.detectors.base import Detector
from diffmem.eval.detection import detection_metrics, plot_roc
from diffmem.eval.protocol import (
    CombinationSpace,
    Entry,
    Target,
    confirmed_or_negative,
    evaluate_split,
    labelled_prompts,
    over_split_seeds,
    read_labels,
    reference_captions,
    split_captions,
    strata_of,
    uses_training_images,
)
from diffmem.io import atomic_write_text
from diffmem.jobs import prompt_hash, settings_digest
from diffmem.models import load_model
from diffmem.prompts import PromptSet
from diffmem.provenance import portable_json
from diffmem.scan import SCORES_FILE, ScanSettings, run_scan
from diffmem.zoo.paths import DEFAULT_CORPUS, zoo_dir
from diffmem.zoo.prompts import NEGATIVE_GROUPS, REFERENCE_KINDS

COMBINATIONS = [["noise-norm", "sharpness", "attention-entropy"],  # noise-step signals only
                ["nn-margin", "sharpness", "attention-entropy"]]  # the image margin with the two best of them


def replication_rates(prompts, rates: Path) -> np.ndarray:
    """Each prompt's replication rate over every labelled seed, from ``label_stability.py``'s rates file
    (shipped + retest generations), NaN where the file is absent."""
    if not rates.is_file():
        return np.full(len(prompts.ids), np.nan)
    by_id = {str(r["item_id"]): r["replication_rate"] for r in map(json.loads, rates.read_text().splitlines())}
    return np.array([by_id[i] for i in prompts.ids])


def _alive(pid: int | None) -> bool:
    """Whether a process with this id runs now (a session it holds open is still going)."""
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Timings:
    """Wall-clock seconds of every session of every scan, kept in the benchmark's own state file.

    ``begin`` records a session's start (and process id) before any work, ``end`` its end; a session
    that never ended and whose process is gone (killed) is closed at the modification time of the last
    part its folder got after the start, so the parts it finished are counted. ``seconds`` sums a key's
    sessions. Several processes may scan different groups into one work folder at once: each merges
    only its own entries into the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict = json.loads(path.read_text()) if path.is_file() else {}
        for entry in self.state.values():
            for session in entry["sessions"]:
                if "end" not in session and not _alive(session.get("pid")):
                    parts = Path(entry["folder"]) / "parts" if entry.get("folder") else None
                    mtimes = [p.stat().st_mtime for p in parts.glob("*.parquet")] if parts and parts.is_dir() else []
                    session["end"] = max([session["start"], *[t for t in mtimes if t >= session["start"]]])
                    session["interrupted"] = True
        self._save()

    def _save(self, key: str | None = None) -> None:
        """Write the state; with ``key``, merge that entry into the file as it is now, so processes scanning
        other groups into the same work folder at the same time keep theirs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if key is not None and self.path.is_file():
            self.state = {**json.loads(self.path.read_text()), key: self.state[key]}
        atomic_write_text(self.path, json.dumps(self.state, indent=2))

    def begin(self, key: str, folder: Path | None = None, start: float | None = None, **info) -> None:
        if self.path.is_file():  # another process may have recorded this key since we started
            self.state.update({k: v for k, v in json.loads(self.path.read_text()).items() if k not in self.state})
        entry = self.state.setdefault(key, {"folder": str(folder) if folder else None, "sessions": [], **info})
        entry["sessions"].append({"start": start or time.time(), "pid": os.getpid()})
        self._save(key)

    def end(self, key: str, **info) -> None:
        entry = self.state[key]
        entry["sessions"][-1]["end"] = time.time()
        entry.update(info)
        self._save(key)

    def seconds(self, key: str) -> float | None:
        sessions = self.state.get(key, {}).get("sessions", [])
        return round(sum(s["end"] - s["start"] for s in sessions), 1) if sessions else None

    def summary(self, key: str) -> dict:
        entry = self.state.get(key, {})
        sessions = entry.get("sessions", [])
        return {"seconds": self.seconds(key), "sessions": len(sessions),
                "interrupted_sessions": sum(bool(s.get("interrupted")) for s in sessions),
                **{k: v for k, v in entry.items() if k not in ("sessions", "folder", "stats")}}


def finished_scan(folder: Path, model, prompts: PromptSet, detectors: list[Detector],
                  settings: ScanSettings) -> Path | None:
    """``scores.parquet`` of a finished scan of the same model, prompts, detectors, draws and seed, else None.

    Compares only what determines the scores, so a finished scan stays usable when the scan's settings
    gain a new field whose default leaves the scores as they were.
    """
    path, prov_path = folder / SCORES_FILE, folder / "provenance.json"
    if not (path.is_file() and prov_path.is_file()):
        return None
    prov = json.loads(prov_path.read_text())
    same = (prov["model"]["fingerprint"] == model.describe()["fingerprint"]
            and prov["prompts"]["sha256_16"] == prompt_hash(prompts)
            and json.loads(json.dumps(prov["detectors"])) == json.loads(json.dumps([d.config() for d in detectors],
                                                                                   default=str))
            and all(prov["settings"].get(k) == getattr(settings, k) for k in ("n_draws", "seed", "schedule_steps"))
            and prov["settings"].get("seed_per_prompt", False) == getattr(settings, "seed_per_prompt", False))
    return path if same else None


def scan_group(label: str, model, prompts: PromptSet, detectors: list[Detector], settings: ScanSettings,
               work: Path, timings: Timings) -> tuple[dict[str, np.ndarray], str]:
    """Scores of one detector group, from its finished folder or a (resumed) scan; returns (scores, key)."""
    start = time.time()  # a detector's config may build its training index (counted in the scan's time)
    # the model's fingerprint is part of the key: a new checkpoint in the same --work scans anew
    settings_key = [model.fingerprint, [d.config() for d in detectors], settings.n_draws, settings.seed]
    key = f"{label}-{settings_digest(settings_key)}"
    folder = work / key
    path = finished_scan(folder, model, prompts, detectors, settings)
    if path is None:
        timings.begin(key, folder, start, detectors=[d.name for d in detectors], n_draws=settings.n_draws,
                      prompts=len(prompts))
        path = run_scan(model, prompts, detectors, folder, settings)
        timings.end(key)
    else:
        print(f"{label}: reusing the finished scan in {folder}")
    table = pq.read_table(path)
    return {d.name: table.column(d.name).to_numpy() for d in detectors}, key


def bound(detector: Detector, model) -> Detector:
    """``detector`` bound to the scanned model (:meth:`Detector.bind`), as ``run_scan`` binds: the image-space
    detectors resolve the model's own training images here, before their ``config()`` is digested."""
    detector.bind(model)
    return detector


def combination(members: list[str], image_detectors: list[Detector], reference: list[str],
                engine: NoiseStepEngine, timings: Timings) -> tuple[Detector, str]:
    """A prepared ``combined`` detector; its reference statistics are computed once and kept in the state."""
    # members as scanned above: their options only (config() also records e.g. the training index's groups)
    same_settings = {d.name: {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if not f.name.startswith("_")
                              and f.name != "name"} for d in image_detectors if d.name in members}
    member_configs = [bound(make_detector(m, **same_settings.get(m, {})), engine.model).config() for m in members]
    # keyed by the model too: another checkpoint's reference statistics are never reused
    settings_key = [engine.model.fingerprint, member_configs, reference, engine.n_draws, engine.seed]
    key = f"combined-reference-{settings_digest(settings_key)}"
    stats = timings.state.get(key, {}).get("stats")
    combined = bound(make_detector("combined", members=members, reference_prompts=reference,
                                   member_options=same_settings, **({"stats": stats} if stats else {})), engine.model)
    if stats:
        combined.prepare(engine)  # members only: the statistics are given
    else:
        timings.begin(key, members=members, reference_prompts=len(reference))
        combined.prepare(engine)
        timings.end(key, stats=combined.stats)
    return combined, key


# the embedded zoos' defaults: corpus -> (results file, work folder, replication-rates file); "zoo" is the default zoo
ZOO_CORPUS_RUNS = {"collapse": ("detection.json", "runs/bench-detection",
                                 "benchmarks/results/zoo_replication_rates.jsonl"),
                   "sd": ("detection_sd.json", "runs/bench-detection-sd", None)}
ZOO_RUNS = {name: (corpus, *ZOO_CORPUS_RUNS[corpus])
            for name, corpus in (("zoo", DEFAULT_CORPUS), ("zoo:collapse", "collapse"), ("zoo:sd", "sd"))}
CANDIDATE_MEMBERS = ("noise-norm", "anisotropy", "sharpness", "attention-entropy")  # a dev-chosen combination's


def run_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on the model: an embedded zoo's labels, results file, work
    folder and rates file; any other model needs ``--labels`` (and gets ``detection_<name>.json``)."""
    corpus, out, work, rates = ZOO_RUNS.get(args.model, (None, None, None, None))
    if args.labels is None:
        if corpus is None:
            raise SystemExit(f"--labels is needed for model '{args.model}' (only the embedded zoos have labels)")
        args.labels = str(zoo_dir(corpus) / "labels.jsonl")
    slug = "".join(c if c.isalnum() else "_" for c in Path(args.model).name).strip("_") or "model"
    args.out = args.out or f"benchmarks/results/{out or f'detection_{slug}.json'}"
    args.work = args.work or work or f"runs/bench-detection-{slug}"
    args.rates = rates if args.rates is None else (args.rates or None)
    args.corpus = corpus
    return args


def heldout_report(entries: list[Entry], y: np.ndarray, kinds: np.ndarray, prompts: PromptSet, args,
                   combinations: CombinationSpace | None) -> dict:
    """The dev / test protocol (diffmem.eval.protocol) for every split seed, and the spread over seeds."""
    target = Target()
    strata = strata_of(kinds.tolist(), y.tolist())
    splits = {}
    for seed in args.split_seeds:
        split = split_captions(prompts.texts, strata, seed, args.dev_fraction)
        splits[seed] = {"split": split.describe(prompts.ids, prompts.texts),
                        **evaluate_split(entries, y, kinds.tolist(), split, target, combinations,
                                         NEGATIVE_GROUPS)}
    return {"protocol": "every choice by label (variant of a detector, a combination's members, the flagging "
                        "threshold, the best noise-step detector) on dev; every figure on test",
            "selection": "dev AUROC, then dev TPR@1%FPR (strict); ties: fewer UNet calls",
            "target": target.describe(), "dev_fraction": args.dev_fraction,
            "negative_groups": "test positives against all test negatives, ordinary captions only "
                               "(generic, heldout_generic) and once-seen titles only (title)",
            "splits": {str(k): v for k, v in splits.items()},
            "over_split_seeds": over_split_seeds(splits) if len(splits) > 1 else None}


def print_heldout(heldout: dict) -> None:
    """The test figures of the first split seed and what dev chose."""
    seed, report = next(iter(heldout["splits"].items()))
    print(f"held out (split seed {seed}, {report['split']['n_dev']} dev / {report['split']['n_test']} test):")
    print(f"{'detector':<64} {'test AUROC':>10} {'TPR@1% s/c':>12} {'target s/c':>10}")
    for k, m in report["detectors"].items():
        t, meets = m["test"], m["meets_target"]
        if t.get("auroc") is None:
            print(f"{k:<64} {'-':>10}")
            continue
        tpr = t["tpr@0.01fpr"]
        print(f"{k:<64} {t['auroc']:10.4f} {tpr['strict']:6.3f}/{tpr['closest']:.3f} "
              f"{'yes' if meets['strict'] else 'no':>5}/{'yes' if meets['closest'] else 'no'}")
    for seed, report in heldout["splits"].items():
        best = report["chosen_on_dev"].get("best_noise_step")
        if best:
            print(f"split {seed}: best noise-step on dev: {best['chosen']}, meets the target on test: "
                  f"{best['meets_target']}")


def detector_results(entries, scores: dict[str, np.ndarray], y: np.ndarray, kinds: np.ndarray,
                     families: np.ndarray, mixed: list[str], rate: np.ndarray, confident: np.ndarray, model,
                     timing_keys: dict[str, list[str]]) -> tuple[dict, dict]:
    """Every detector's metrics on every labelled prompt (choices not held out) and its ROC inputs."""
    results, curves = {}, {}
    for name, det, column, draws in entries:
        s = scores[column]
        m = detection_metrics(y, s)
        m["unet_calls_per_prompt"] = det.unet_calls_per_prompt(NoiseStepEngine(model, draws))
        m["by_kind_of_positive"] = {k: detection_metrics(y[(~y) | (kinds == k)], s[(~y) | (kinds == k)])["auroc"]
                                    for k in sorted(set(kinds[y]))}
        # within one caption family (zoo v1: memorized scenes vs the scenes that generalised), so a score
        # that only tells the two families apart cannot look good here
        m["within_family"] = {f: detection_metrics(y[families == f], s[families == f])["auroc"] for f in mixed}
        if np.isfinite(rate).any():  # stable labels only: replicates in >= half of all seeds, or in none
            c = confident & np.isfinite(rate)
            m["confident"] = detection_metrics(rate[c] >= 0.5, s[c])
        m["timing_parts"] = sorted(set(timing_keys[name]))  # keys of "timings": the scans its scores come from
        results[name] = m
        curves[name] = (y, s)
    return results, curves


def print_results(results: dict) -> None:
    """Every detector's AUROC, TPR@1%FPR and UNet calls on every labelled prompt."""
    print(f"{'detector':<48} {'AUROC':>7} {'TPR@1% strict/closest':>22} {'calls':>7}")
    for k, m in results.items():
        t = m["tpr@0.01fpr"]
        within = " ".join(f"{f}={a:.3f}" for f, a in m["within_family"].items())
        if "confident" in m:
            c = m["confident"]
            within += f"  confident: AUROC {c['auroc']:.3f} TPR@1% {c['tpr@0.01fpr']['strict']:.3f}"
        print(f"{k:<48} {m['auroc']:7.4f} {t['strict']:10.3f}/{t['closest']:.3f} {m['unet_calls_per_prompt']:7.0f}"
              f"  within family: {within}")


def scan_plan(args: argparse.Namespace, model, reference: list[str]):
    """Every scan group ``(label, detectors, draws)``, headline detectors first, each scanned into its own folder
    (a change of one detector's settings rescans that group alone); the image detectors, those of the headline,
    and the display name of a detector at a draw count."""
    image_ok = bool(args.image_samples)  # without --image-index they use the scanned zoo's own training images
    index = {"index": args.image_index} if args.image_index else {}
    image_detectors = ([bound(make_detector("nn-ratio", samples=args.image_samples, steps=10, stop_after=4, **index),
                              model)]
                       + [bound(make_detector("nn-margin", samples=args.margin_samples, steps=10, stop_after=k,
                                              **index), model) for k in args.margin_stop_after]
                       if image_ok else [])
    headline_images = [d for d in image_detectors if d.name != "nn-margin" or d.stop_after == args.margin_stop_after[0]]
    pretty = {"noise-norm-trajectory": f"noise-norm-trajectory (steps={args.trajectory_steps}, gens=4)",
              **{id(d): f"{d.name} (samples={d.samples}, {d.stop_after}/{d.steps} steps)" for d in image_detectors}}

    def name_of(d: Detector, draws: int) -> str:
        return pretty.get(id(d), pretty.get(d.name, f"{d.name} (draws={draws})"))

    def image_label(d: Detector) -> str:  # today's label for the first step, so its scan folder is reused
        first_step = d.name != "nn-margin" or d.stop_after == args.margin_stop_after[0]
        return f"image-{d.name}-s{d.samples}" + ("" if first_step else f"-k{d.stop_after}")

    # every scan group: (label, detectors, draws), the headline detectors first; each in its own folder, so a
    # change of one detector's settings rescans that group alone
    first = args.draws[0]
    groups: list[tuple[str, list[Detector], int]] = [
        (f"draws{first}", [make_detector("noise-norm"), make_detector("anisotropy"),
                           make_detector("anisotropy-calibrated", reference_prompts=reference),
                           make_detector("sharpness")], first),
        (f"attention-entropy-draws{first}", [make_detector("attention-entropy")], first)]
    groups += [(image_label(d), [d], 1) for d in image_detectors[1:] + image_detectors[:1]]  # nn-margin first
    groups.append((f"trajectory-steps{args.trajectory_steps}",
                   [make_detector("noise-norm-trajectory", steps=args.trajectory_steps, generations=4)], first))
    groups += [(f"draws{draws}", [make_detector("noise-norm"), make_detector("anisotropy"),
                                  make_detector("anisotropy-calibrated", reference_prompts=reference)], draws)
               for draws in args.draws[1:]]
    return groups, image_detectors, headline_images, name_of


def write_scores(out: Path, curves: dict, scores: dict[str, np.ndarray], prompts, y: np.ndarray) -> None:
    """The ROC plot beside ``out`` and every prompt's scores in ``<out stem>_scores.parquet``."""
    plot_roc(curves, out.with_suffix(".png"), title=f"zoo: {int(y.sum())} memorized, {int((~y).sum())} not")
    scores_path = out.with_name(f"{out.stem}_scores.parquet")
    columns = {k: pa.array(v, pa.float64()) for k, v in scores.items()}
    table = pa.table({"id": prompts.ids, "text": prompts.texts, **columns})
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, scores_path, compression="zstd", compression_level=19)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (defaults that depend on the model are filled by :func:`run_defaults`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo",
                        help="model spec: zoo (the default zoo, default), zoo:collapse, zoo:sd, a folder")
    parser.add_argument("--labels", default=None,
                        help="labels file (JSON lines: caption, kind, memorized, replication, family); "
                             "default: the zoo's labels.jsonl")
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--trajectory-steps", type=int, default=10)
    parser.add_argument("--max-per-kind", type=int, default=600, help="negatives kept per caption kind")
    parser.add_argument("--work", default=None, help="scan folders and state (default per zoo)")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/detection.json for "
                                                    "the collapse zoo, detection_sd.json for zoo:sd)")
    parser.add_argument("--image-samples", type=int, default=4,
                        help="generations per prompt of nn-ratio (0: skip both image detectors)")
    parser.add_argument("--margin-samples", type=int, default=8, help="nn-margin's own (default: 8, its default)")
    parser.add_argument("--margin-stop-after", type=int, nargs="+", default=[8],
                        help="nn-margin's x0 step(s) out of 10; with several, the step is chosen on dev")
    parser.add_argument("--image-index", default=None,
                        help="training-image folder of the image detectors (default: the scanned zoo's own)")
    parser.add_argument("--rates", default=None,
                        help="label_stability.py's rates file: adds the confident-subset metrics (default: the "
                             "collapse zoo's; '' for none)")
    parser.add_argument("--reference", type=int, default=200, help="ordinary reference prompts (left out)")
    parser.add_argument("--reference-kinds", nargs="+", default=list(REFERENCE_KINDS),
                        help="kinds the reference prompts are drawn from, alternating (those the labels have)")
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds of the dev / test split of the captions (the first is the headline)")
    parser.add_argument("--dev-fraction", type=float, default=0.5, help="share of each stratum in dev")
    parser.add_argument("--combine-max-calls", type=float, default=32,
                        help="UNet-call limit of the combination whose members are chosen on dev")
    parser.add_argument("--only", nargs="*", default=None,
                        help="scan only the groups whose label starts with one of these (e.g. draws8 image-; "
                             "'combined': the noise-step combinations' reference passes); no results are written")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="leave out the groups whose label starts with one of these (recorded in the JSON)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced prompts kept (a quick smoke run)")
    parser.add_argument("--positive-kinds", nargs="*", default=None,
                        help="caption kinds whose memorized captions are positives (e.g. signature template "
                             "heldout_template: memorization by duplication); memorized captions of any other kind "
                             "are left out of the set, not counted as negatives (default: every kind)")
    parser.add_argument("--min-memorized-seeds", type=int, default=1,
                        help="positives must reproduce a training image in at least this many of their labelling "
                             "seeds; memorized captions below it are left out, not counted as negatives (default 1: "
                             "the label as written; 2 drops single-seed matches, the label's null false positives)")
    return parser


def main() -> None:
    args = run_defaults(build_parser().parse_args())
    work = Path(args.work)
    timings = Timings(work / "state.json")
    model = load_model(args.model)
    rows = read_labels(args.labels)
    label_kinds = {r["kind"] for r in rows}
    reference = sorted(reference_captions(rows, [k for k in args.reference_kinds if k in label_kinds], args.reference))
    # every labelled prompt is scanned, with or without --positive-kinds, so both views of the labels share one
    # scan per detector group (and the same negatives); the left-out captions are dropped after scanning
    prompts = labelled_prompts(rows, args.max_per_kind, exclude=set(reference), source=f"labels:{args.labels}")
    if args.limit:
        prompts = prompts.evenly(args.limit)
    skip_reasons: dict[str, str] = {}
    groups, image_detectors, headline_images, name_of = scan_plan(args, model, reference)
    first = args.draws[0]
    if args.only is not None:
        groups = [g for g in groups if g[0].startswith(tuple(args.only))]
    skipped = [g[0] for g in groups if g[0].startswith(tuple(args.skip))]
    groups = [g for g in groups if g[0] not in skipped]
    skipped += [prefix for prefix in skip_reasons]

    scores: dict[str, np.ndarray] = {}
    entries: list[tuple[str, Detector, str, int]] = []  # (result key, detector, score column, draws)
    timing_keys: dict[str, list[str]] = {}
    for label, dets, draws in groups:
        group_scores, key = scan_group(label, model, prompts, dets, ScanSettings(n_draws=draws), work, timings)
        for d in dets:
            name = name_of(d, draws)
            scores[name] = group_scores[d.name]
            entries.append((name, d, name, draws))
            timing_keys[name] = [key]
    if args.positive_kinds or args.min_memorized_seeds > 1:
        # memorized captions of other kinds, or reproduced in fewer seeds, are neither positives nor negatives
        kept = confirmed_or_negative(prompts, args.positive_kinds, args.min_memorized_seeds)
        print(f"--positive-kinds / --min-memorized-seeds: left out {len(prompts) - len(kept)} memorized captions")
        prompts = prompts.take(kept)
        scores = {name: column[kept] for name, column in scores.items()}
    y = np.array(prompts.columns["memorized"], dtype=bool)
    kinds = np.array(prompts.columns["kind"])
    families = np.array(prompts.columns["family"])
    mixed = [f for f in sorted(set(families)) if y[families == f].any() and (~y[families == f]).any()]
    rate = replication_rates(prompts, Path(args.rates)) if args.rates else np.full(len(prompts), np.nan)
    confident = (rate >= 0.5) | (rate == 0)
    engine = NoiseStepEngine(model, first)
    members_of = {d.name: name_of(d, dr) for _, ds, dr in groups if dr in (first, 1) for d in ds
                  if d.name != "nn-margin" or d in headline_images}
    candidates = [m for m in CANDIDATE_MEMBERS if m in members_of]
    if args.only is not None:
        if "combined" in args.only:  # the reference passes of the noise-step combinations, kept in the state
            for members in [*COMBINATIONS, list(CANDIDATE_MEMBERS)]:
                if not any(d.name in members for d in image_detectors):
                    combination(members, headline_images, reference, engine, timings)
        print("scanned:", [g[0] for g in groups])
        return

    for members in COMBINATIONS[: 2 if image_detectors else 1]:
        if not all(m in members_of for m in members):
            continue  # a member's group was skipped
        combined, key = combination(members, headline_images, reference, engine, timings)
        name = f"combined ({' + '.join(members)})"
        scores[name] = combined.combine({m: scores[members_of[m]] for m in members}).numpy()
        entries.append((name, combined, name, first))
        timing_keys[name] = [k for m in members for k in timing_keys[members_of[m]]] + [key]
    space = None
    if len(candidates) > 1:  # reference statistics of every candidate member, for the dev-chosen combination
        pool, pool_key = combination(candidates, headline_images, reference, engine, timings)

        def cost(members: tuple[str, ...]) -> float:
            return make_detector("combined", members=list(members), stats={m: pool.stats[m] for m in members}
                                 ).unet_calls_per_prompt(engine)

        space = CombinationSpace({m: scores[members_of[m]] for m in candidates}, dict(pool.stats), cost,
                                 args.combine_max_calls, display={m: members_of[m] for m in candidates})

    results, curves = detector_results(entries, scores, y, kinds, families, mixed, rate, confident, model,
                                       timing_keys)
    held = [Entry(name, scores[column], results[name]["unet_calls_per_prompt"], uses_training_images(det.config()),
                  None if det.name == "combined" else det.name) for name, det, column, _ in entries]
    heldout = heldout_report(held, y, kinds, prompts, args, space)
    if space is not None:
        heldout["combination_candidates"] = {"members": list(space.display.values()), "stats": space.stats,
                                             "max_unet_calls": args.combine_max_calls, "timing_part": pool_key}

    write_scores(Path(args.out), curves, scores, prompts, y)
    used = sorted({k for keys in timing_keys.values() for k in keys} | ({pool_key} if space is not None else set()))
    record = {"benchmark": "detection", "model": model.describe(), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
              "labels": args.labels,
              "by_kind": {k: {"positives": int((y & (kinds == k)).sum()), "negatives": int((~y & (kinds == k)).sum())}
                          for k in sorted(set(kinds))},
              "reference_prompts_excluded": len(reference), "max_negatives_per_kind": args.max_per_kind,
              "positive_kinds": args.positive_kinds, "min_memorized_seeds": args.min_memorized_seeds,
              "confident_subset": {"source": args.rates, "positives": int((rate >= 0.5).sum()),
                                   "negatives": int((rate == 0).sum())} if np.isfinite(rate).any() else None,
              "scores_file": f"{Path(args.out).stem}_scores.parquet", "skipped_groups": skipped,
              "skip_reasons": skip_reasons,
              "timings": {k: timings.summary(k) for k in used},
              "timings_note": "wall-clock seconds summed over every session of a scan (resumes included); "
                              "None: scanned before timings were recorded",
              "results_note": "results: every labelled prompt, choices not held out; heldout: dev / test protocol",
              "results": results, "heldout": heldout}
    atomic_write_text(Path(args.out), portable_json(record))
    print_results(results)
    print_heldout(heldout)
    for k in used:
        print(f"time {k}: {timings.seconds(k)} s")


if __name__ == "__main__":
    main()
