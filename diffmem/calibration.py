"""Detector thresholds calibrated on prompts known to be ordinary, and flags that hold a stated FPR.

``diffmem calibrate`` scans ordinary prompts and stores every detector's scores together with what they
were made with (model fingerprint, detector settings, noise draws and seed). ``diffmem scan
--calibration FILE --fpr A`` then flags:

- per detector (``flagged_<detector>``): score above the detector's threshold at FPR ``A`` on the
  calibration scores (:func:`diffmem.eval.detection.threshold_at_fpr`);
- combined (``flagged``): an OR over k detectors at FPR ``A`` each would have a false-positive rate of up
  to k x ``A``. Instead each score is turned into its calibrated upper-tail p-value
  ``p_d(s) = (1 + #{calibration scores of d >= s}) / (n_d + 1)`` and a prompt is flagged when the
  smallest p-value over detectors, ``m = min_d p_d``, is below the cut-off ``t`` chosen on the
  calibration prompts' own ``m`` values so that at most ``floor(A * n)`` of them fall below it. The
  combination is thus calibrated as a whole (the "min-p" rule; a permutation-free version of the
  max-statistic correction, cf. Westfall & Young 1993): on the calibration set its FPR is <= ``A`` by
  construction, and unlike a Bonferroni split (``A / k`` each) it keeps the power of correlated detectors.

A calibration is valid only for the model and settings it was made with; :func:`calibration_mismatches`
names what differs and the CLI refuses it unless ``--accept-calibration-mismatch`` is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffmem.errors import DiffmemError

CALIBRATION_FILE = "calibration.json"
COMBINED_RULE = "min-p"
# scan settings that change scores (batch size does not)
SCORE_SETTINGS = ("n_draws", "seed", "schedule_steps", "seed_per_prompt")
# the value a provenance without the key was made with (shared draws before --seed-per-prompt existed)
SETTING_DEFAULTS: dict[str, Any] = {"seed_per_prompt": False}


@dataclass
class Calibration:
    """Ordinary prompts' scores per detector and the provenance of the scan that made them."""

    scores: dict[str, np.ndarray]
    provenance: dict[str, Any]
    path: str = "<memory>"

    @property
    def n(self) -> int:
        return max((len(v) for v in self.scores.values()), default=0)


def check_fpr(fpr: float) -> float:
    """A false-positive rate strictly between 0 and 1, or a one-line error (0 is not silently 0.01)."""
    if not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise DiffmemError(f"--fpr must be between 0 and 1 (exclusive), got {fpr!r}")
    return float(fpr)


def load_calibration(path: str | Path, detectors: list[str] | None = None) -> Calibration:
    """Read and check a ``calibration.json`` (exists, parses, holds finite scores for ``detectors``)."""
    p = Path(path)
    if p.is_dir() and (p / CALIBRATION_FILE).is_file():
        p = p / CALIBRATION_FILE
    if not p.is_file():
        what = "is a folder without calibration.json" if p.is_dir() else "does not exist"
        raise DiffmemError(f"--calibration '{path}' {what}; expected the calibration.json of `diffmem calibrate`")
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
        raw = record["scores"]
        if not isinstance(raw, dict):
            raise TypeError("'scores' is not a mapping")
        scores = {k: np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
                  for k, vals in raw.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DiffmemError(f"--calibration '{path}' is not a calibration.json of `diffmem calibrate` "
                           f"({type(exc).__name__}: {exc})") from exc
    cal = Calibration(scores, record.get("provenance", {}), str(p))
    missing = [d for d in detectors or [] if d not in scores]
    if missing:
        raise DiffmemError(f"--calibration '{path}' has no scores for detector(s) {missing}; it holds "
                           f"{sorted(scores)} (calibrate with the same --detector list)")
    empty = [d for d in detectors or [] if not np.isfinite(scores[d]).any()]
    if empty:
        raise DiffmemError(f"--calibration '{path}' has no finite scores for detector(s) {empty}")
    return cal


def calibration_record(scores: dict[str, list[float]], provenance: dict[str, Any]) -> dict[str, Any]:
    """What ``calibration.json`` holds: the scores and what they were made with (checked on use)."""
    return {"scores": scores, "model_fingerprint": provenance.get("model", {}).get("fingerprint"),
            "detectors": provenance.get("detectors"),
            "settings": {k: provenance.get("settings", {}).get(k) for k in SCORE_SETTINGS},
            "noise_seeds": provenance.get("noise_seeds"), "n_prompts": provenance.get("prompts", {}).get("n_unique"),
            "provenance": provenance}


def calibration_mismatches(cal: Calibration, scan_provenance: dict[str, Any], names: list[str]) -> list[str]:
    """Each way the scan differs from the calibration (model, a detector's settings, draws, seed...)."""
    out = []
    cal_fp = cal.provenance.get("model", {}).get("fingerprint")
    fp = scan_provenance.get("model", {}).get("fingerprint")
    if cal_fp != fp:
        out.append(f"model fingerprint {fp} (calibrated on {cal_fp})")
    cal_det = {d.get("name"): d for d in cal.provenance.get("detectors", []) if isinstance(d, dict)}
    scan_det = {d.get("name"): d for d in scan_provenance.get("detectors", [])}
    for name in names:
        a, b = json.loads(json.dumps(cal_det.get(name), default=str)), json.loads(json.dumps(scan_det.get(name),
                                                                                          default=str))
        if a != b:
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            out.append(f"detector {name} settings {keys}")
    for key in SCORE_SETTINGS:
        default = SETTING_DEFAULTS.get(key)  # a calibration older than the setting ran with its default
        a = cal.provenance.get("settings", {}).get(key, default)
        b = scan_provenance.get("settings", {}).get(key, default)
        if a != b:
            out.append(f"{'draws' if key == 'n_draws' else key} {b} (calibrated with {a})")
    return out


def upper_tail_p(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(1 + #{c >= s}) / (n + 1)`` per score over the finite calibration scores; NaN scores get 1."""
    c = np.sort(calibration[np.isfinite(calibration)])
    s = np.asarray(scores, dtype=np.float64)
    ge = len(c) - np.searchsorted(c, np.where(np.isnan(s), np.inf, s), side="left")
    p = (1 + ge) / (len(c) + 1)
    return np.where(np.isnan(s), 1.0, p)


def min_p(cal: Calibration, names: list[str], scores: dict[str, np.ndarray]) -> np.ndarray:
    """The combined statistic ``m = min_d p_d`` of every row of ``scores``."""
    return np.min(np.stack([upper_tail_p(cal.scores[n], scores[n]) for n in names]), axis=0)


def combined_cutoff(cal: Calibration, names: list[str], fpr: float) -> float:
    """The cut-off ``t``: at most ``floor(fpr * n)`` calibration prompts have ``m < t``."""
    n = min(len(cal.scores[d]) for d in names)
    m = np.sort(min_p(cal, names, {d: cal.scores[d][:n] for d in names}))
    k = int(math.floor(check_fpr(fpr) * len(m)))
    return float(m[min(k, len(m) - 1)])


@dataclass
class Flagging:
    """The thresholds used to flag a scan and how the combined flag was made (saved in provenance)."""

    fpr: float
    thresholds: dict[str, float]
    combined_rule: str
    combined_cutoff: float
    calibration: str
    n_calibration: int
    warnings: list[str]

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def flag(table: pa.Table, cal: Calibration, names: list[str], fpr: float) -> tuple[pa.Table, Flagging]:
    """Add ``flagged_<detector>`` (per-detector FPR ``fpr``; null where the score is NaN), ``min_p`` and
    ``flagged`` (the min-p combination, FPR ``fpr`` overall) to a scan table."""
    check_fpr(fpr)
    from diffmem.eval.detection import threshold_at_fpr  # sklearn: imported only when calibrating

    thresholds = {n: threshold_at_fpr(cal.scores[n], fpr) for n in names}
    warnings = []
    n_cal = min(int(np.isfinite(cal.scores[n]).sum()) for n in names)
    if n_cal * fpr < 1:
        warnings.append(f"only {n_cal} calibration prompts: FPR {fpr:g} needs at least {math.ceil(1 / fpr)} "
                        "to be estimated; flags are conservative (calibrate on more ordinary prompts)")
    for col in [c for c in table.column_names if c.startswith("flagged") or c == "min_p"]:
        table = table.drop_columns([col])
    scores = {n: table.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names}
    for n in names:
        s = scores[n]
        table = table.append_column(f"flagged_{n}", pa.array(np.where(np.isnan(s), False, s > thresholds[n]).tolist(),
                                                             mask=np.isnan(s)))
    cutoff = combined_cutoff(cal, names, fpr)
    m = min_p(cal, names, scores)
    table = table.append_column("min_p", pa.array(m, pa.float64()))
    if len(names) == 1:  # one detector: the combined flag is its flag
        s = scores[names[0]]
        table = table.append_column("flagged", pa.array(np.where(np.isnan(s), False, s > thresholds[names[0]])))
    else:
        table = table.append_column("flagged", pa.array(m < cutoff))
    return table, Flagging(fpr, thresholds, COMBINED_RULE if len(names) > 1 else "single detector", cutoff, cal.path,
                           n_cal, warnings)
