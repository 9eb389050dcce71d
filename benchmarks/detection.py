"""Benchmark: every detector on the zoo — AUROC, TPR@1%/0.1% FPR (both estimators), UNet calls per prompt.

Positives: captions the zoo's labels call memorized (found by extraction). Negatives: the other
captions (ordinary objects and scenes, held-out generic, never-trained look-alike scenes,
non-memorized signature items), at most ``--max-per-kind`` evenly spaced captions of each kind, and
never the ordinary reference captions that ``anisotropy-calibrated`` and ``combined`` standardise on.

Each group of detectors scans into its own folder under ``--work``, named by a digest of the
detectors' settings and the draws: a rerun reuses every finished scan whose settings are unchanged
and resumes unfinished ones, so changing one detector rescans only that detector. The wall-clock time
of every scan session (and of each combination's reference pass) is kept in ``--work/state.json``;
a session that was killed is counted up to its last written part. The JSON reports the sum over
sessions, so a resumed run never overwrites a timing with the resume's own few seconds.

Writes ``--out`` (JSON), the ROC plot beside it (``.png``) and every prompt's scores
(``<out stem>_scores.parquet``, zstd): ``diffmem eval detect --scores benchmarks/results/detection_scores.parquet
--labels diffmem/zoo/checkpoint/labels.jsonl`` regenerates the AUROC and TPR columns.

    .venv/bin/python benchmarks/detection.py --draws 8 32 --max-per-kind 1000
"""

from __future__ import annotations

import argparse
import hashlib
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
from diffmem.io import atomic_write_text
from diffmem.jobs import prompt_hash
from diffmem.models import load_model
from diffmem.prompts import PromptSet
from diffmem.scan import SCORES_FILE, ScanSettings, run_scan
from diffmem.zoo.prompts import zoo_prompts, zoo_reference_prompts

COMBINATIONS = [["noise-norm", "sharpness", "attention-entropy"],  # noise-step signals only
                ["nn-margin", "sharpness", "attention-entropy"]]  # the image margin with the two best of them


def replication_rates(prompts, rates: Path) -> np.ndarray:
    """Each prompt's replication rate over every labelled seed, from ``label_stability.py``'s rates file
    (shipped + retest generations), NaN where the file is absent."""
    if not rates.is_file():
        return np.full(len(prompts.ids), np.nan)
    by_id = {str(r["item_id"]): r["replication_rate"] for r in map(json.loads, rates.read_text().splitlines())}
    return np.array([by_id[i] for i in prompts.ids])


def digest(obj) -> str:
    """A short stable digest of JSON-able settings (names a scan folder after what determines its scores)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
    key = f"{label}-{digest([[d.config() for d in detectors], settings.n_draws, settings.seed])}"
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


def combination(members: list[str], image_detectors: list[Detector], reference: list[str],
                engine: NoiseStepEngine, timings: Timings) -> tuple[Detector, str]:
    """A prepared ``combined`` detector; its reference statistics are computed once and kept in the state."""
    same_settings = {d.name: {k: v for k, v in d.config().items() if k != "name"}
                     for d in image_detectors if d.name in members}  # members as scanned above
    member_configs = [make_detector(m, **same_settings.get(m, {})).config() for m in members]
    key = f"combined-reference-{digest([member_configs, reference, engine.n_draws, engine.seed])}"
    stats = timings.state.get(key, {}).get("stats")
    combined = make_detector("combined", members=members, reference_prompts=reference, member_options=same_settings,
                             **({"stats": stats} if stats else {}))
    if stats:
        combined.prepare(engine)  # members only: the statistics are given
    else:
        timings.begin(key, members=members, reference_prompts=len(reference))
        combined.prepare(engine)
        timings.end(key, stats=combined.stats)
    return combined, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--trajectory-steps", type=int, default=10)
    parser.add_argument("--max-per-kind", type=int, default=600, help="negatives kept per caption kind")
    parser.add_argument("--work", default="runs/bench-detection")
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    parser.add_argument("--image-samples", type=int, default=4,
                        help="generations per prompt of nn-ratio (0: skip both image detectors)")
    parser.add_argument("--margin-samples", type=int, default=8, help="nn-margin's own (default: 8, its default)")
    parser.add_argument("--rates", default="benchmarks/results/zoo_replication_rates.jsonl",
                        help="label_stability.py's rates file: adds the confident-subset metrics (skipped if absent)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="scan only the groups whose label starts with one of these (e.g. draws8 image-; "
                             "'combined': the noise-step combinations' reference passes); no results are written")
    parser.add_argument("--skip", nargs="*", default=[],
                        help="leave out the groups whose label starts with one of these (recorded in the JSON)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced prompts kept (a quick smoke run)")
    args = parser.parse_args()
    work = Path(args.work)
    timings = Timings(work / "state.json")
    model = load_model()
    reference = sorted(zoo_reference_prompts())  # sorted, as every earlier run passed them
    prompts = zoo_prompts(args.max_per_kind, exclude=set(reference))
    if args.limit:
        prompts = prompts.evenly(args.limit)
    y = np.array(prompts.columns["memorized"], dtype=bool)
    kinds = np.array(prompts.columns["kind"])
    families = np.array(prompts.columns["family"])
    mixed = [f for f in sorted(set(families)) if y[families == f].any() and (~y[families == f]).any()]
    rate = replication_rates(prompts, Path(args.rates))
    confident = (rate >= 0.5) | (rate == 0)
    image_detectors = ([make_detector("nn-ratio", samples=args.image_samples, steps=10, stop_after=4),
                        make_detector("nn-margin", samples=args.margin_samples, steps=10, stop_after=8)]
                       if args.image_samples else [])
    pretty = {"noise-norm-trajectory": f"noise-norm-trajectory (steps={args.trajectory_steps}, gens=4)",
              **{d.name: f"{d.name} (samples={d.samples}, {d.stop_after}/{d.steps} steps)" for d in image_detectors}}

    # every scan group: (label, detectors, draws), the headline detectors first; each in its own folder, so a
    # change of one detector's settings rescans that group alone
    first = args.draws[0]
    groups: list[tuple[str, list[Detector], int]] = [
        (f"draws{first}", [make_detector("noise-norm"), make_detector("anisotropy"),
                           make_detector("anisotropy-calibrated", reference_prompts=reference),
                           make_detector("sharpness")], first),
        (f"attention-entropy-draws{first}", [make_detector("attention-entropy")], first)]
    groups += [(f"image-{d.name}-s{d.samples}", [d], 1) for d in image_detectors[::-1]]  # nn-margin first
    groups.append((f"trajectory-steps{args.trajectory_steps}",
                   [make_detector("noise-norm-trajectory", steps=args.trajectory_steps, generations=4)], first))
    groups += [(f"draws{draws}", [make_detector("noise-norm"), make_detector("anisotropy"),
                                  make_detector("anisotropy-calibrated", reference_prompts=reference)], draws)
               for draws in args.draws[1:]]
    if args.only is not None:
        groups = [g for g in groups if g[0].startswith(tuple(args.only))]
    skipped = [g[0] for g in groups if g[0].startswith(tuple(args.skip))]
    groups = [g for g in groups if g[0] not in skipped]

    scores: dict[str, np.ndarray] = {}
    entries: list[tuple[str, Detector, str, int]] = []  # (result key, detector, score column, draws)
    timing_keys: dict[str, list[str]] = {}
    for label, dets, draws in groups:
        group_scores, key = scan_group(label, model, prompts, dets, ScanSettings(n_draws=draws), work, timings)
        for d in dets:
            name = pretty.get(d.name, f"{d.name} (draws={draws})")
            scores[name] = group_scores[d.name]
            entries.append((name, d, name, draws))
            timing_keys[name] = [key]
    if args.only is not None:
        if "combined" in args.only:  # the reference passes of the noise-step combinations, kept in the state
            engine = NoiseStepEngine(model, first)
            for members in COMBINATIONS:
                if not any(d.name in members for d in image_detectors):
                    combination(members, image_detectors, reference, engine, timings)
        print("scanned:", [g[0] for g in groups])
        return

    engine = NoiseStepEngine(model, first)
    members_of = {d.name: pretty.get(d.name, f"{d.name} (draws={first})") for _, ds, dr in groups if dr in (first, 1)
                  for d in ds}
    for members in COMBINATIONS[: 2 if image_detectors else 1]:
        if not all(m in members_of for m in members):
            continue  # a member's group was skipped
        combined, key = combination(members, image_detectors, reference, engine, timings)
        name = f"combined ({' + '.join(members)})"
        scores[name] = combined.combine({m: scores[members_of[m]] for m in members}).numpy()
        entries.append((name, combined, name, first))
        timing_keys[name] = [k for m in members for k in timing_keys[members_of[m]]] + [key]

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

    out = Path(args.out)
    plot_roc(curves, out.with_suffix(".png"), title=f"zoo: {int(y.sum())} memorized, {int((~y).sum())} not")
    scores_path = out.with_name(f"{out.stem}_scores.parquet")
    columns = {k: pa.array(v, pa.float64()) for k, v in scores.items()}
    table = pa.table({"id": prompts.ids, "text": prompts.texts, **columns})
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, scores_path, compression="zstd", compression_level=19)
    used = sorted({k for keys in timing_keys.values() for k in keys})
    record = {"benchmark": "detection", "model": model.describe(), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
              "by_kind": {k: {"positives": int((y & (kinds == k)).sum()), "negatives": int((~y & (kinds == k)).sum())}
                          for k in sorted(set(kinds))},
              "reference_prompts_excluded": len(reference), "max_negatives_per_kind": args.max_per_kind,
              "confident_subset": {"source": args.rates, "positives": int((rate >= 0.5).sum()),
                                   "negatives": int((rate == 0).sum())} if np.isfinite(rate).any() else None,
              "scores_file": scores_path.name, "skipped_groups": skipped,
              "timings": {k: timings.summary(k) for k in used},
              "timings_note": "wall-clock seconds summed over every session of a scan (resumes included); "
                              "None: scanned before timings were recorded",
              "results": results}
    atomic_write_text(out, json.dumps(record, indent=2))
    print(f"{'detector':<48} {'AUROC':>7} {'TPR@1% strict/closest':>22} {'calls':>7}")
    for k, m in results.items():
        t = m["tpr@0.01fpr"]
        within = " ".join(f"{f}={a:.3f}" for f, a in m["within_family"].items())
        if "confident" in m:
            c = m["confident"]
            within += f"  confident: AUROC {c['auroc']:.3f} TPR@1% {c['tpr@0.01fpr']['strict']:.3f}"
        print(f"{k:<48} {m['auroc']:7.4f} {t['strict']:10.3f}/{t['closest']:.3f} {m['unet_calls_per_prompt']:7.0f}"
              f"  within family: {within}")
    for k in used:
        print(f"time {k}: {timings.seconds(k)} s")


if __name__ == "__main__":
    main()
