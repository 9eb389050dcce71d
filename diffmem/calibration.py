"""Detector thresholds calibrated on prompts known to be ordinary, and flags that hold a stated FPR.

``diffmem calibrate`` scans ordinary prompts and stores every detector's scores together with what they
were made with (model fingerprint, detector settings, noise draws and seed). ``diffmem scan
--calibration FILE --fpr A`` then flags:

- per detector (``flagged_<detector>``): the detector's conformal p-value
  ``p_d(s) = (1 + #{calibration scores of d >= s}) / (n_d + 1)`` is ``<= A`` (:func:`detector_threshold`
  gives the equivalent score threshold);
- combined (``flagged``): an OR over k detectors at FPR ``A`` each would have a false-positive rate of up
  to k x ``A``. Instead the smallest p-value over detectors, ``m = min_d p_d``, is itself turned into a
  full-conformal p-value (:func:`combined_p`: ``m`` of the new prompt ranked among the calibration prompts'
  ``m``, every one computed inside the set {calibration prompts, new prompt}, ties broken by Fisher's
  combination) and the prompt is flagged when that is ``<= A`` (the "min-p" rule, a permutation-free
  max-statistic correction, cf. Westfall & Young 1993). Unlike a Bonferroni split (``A / k`` each) it keeps
  the power of correlated detectors.

Guarantee: for a prompt drawn like the calibration prompts (exchangeable with them), each flag's
false-positive rate is ``<= A`` at any number ``n`` of calibration prompts (tested by simulation on held-out
prompts in ``tests/test_calibration.py``). It says nothing about prompts of another kind: calibrate on
prompts like the ones you scan. Below ``1 / A - 1`` calibration prompts no prompt can reach ``A`` and
:func:`check_attainable` refuses.

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
    """``(1 + #{c >= s}) / (n + 1)`` per score over the finite calibration scores; NaN scores get 1.

    For a prompt drawn like the calibration prompts (exchangeable with them) this is a conformal p-value:
    ``P(p <= a) <= a`` for every ``a`` and every ``n`` (Vovk et al. 2005; Angelopoulos & Bates 2021, eq. 1).
    """
    c = np.sort(calibration[np.isfinite(calibration)])
    s = np.asarray(scores, dtype=np.float64)
    ge = len(c) - np.searchsorted(c, np.where(np.isnan(s), np.inf, s), side="left")
    p = (1 + ge) / (len(c) + 1)
    return np.where(np.isnan(s), 1.0, p)


def detector_threshold(calibration: np.ndarray, fpr: float) -> float:
    """The score above which :func:`upper_tail_p` is ``<= fpr``: flag ``s > t`` holds a held-out FPR
    ``<= fpr`` at any ``n``. ``inf`` when ``n`` is too small for any score to reach ``fpr``.

    ``p(s) <= fpr`` iff ``#{c >= s} <= r`` with ``r = floor(fpr (n + 1)) - 1``, i.e. iff ``s`` exceeds the
    ``(r + 1)``-th largest calibration score.
    """
    c = np.sort(np.asarray(calibration, dtype=np.float64)[np.isfinite(calibration)])[::-1]
    if len(c) == 0:
        raise DiffmemError("no finite scores among the calibration prompts")
    r = int(math.floor(check_fpr(fpr) * (len(c) + 1) + 1e-9)) - 1
    return float(c[r]) if r >= 0 else math.inf


def min_p(cal: Calibration, names: list[str], scores: dict[str, np.ndarray]) -> np.ndarray:
    """The combined statistic ``m = min_d p_d`` of every row of ``scores`` (small = unusual)."""
    return np.min(np.stack([upper_tail_p(cal.scores[n], scores[n]) for n in names]), axis=0)


def _aligned(cal: Calibration, names: list[str]) -> np.ndarray:
    """Calibration scores as an ``(n, D)`` matrix, NaN (no score) as ``-inf``: least unusual, p = 1."""
    n = min(len(cal.scores[d]) for d in names)
    mat = np.stack([np.asarray(cal.scores[d][:n], dtype=np.float64) for d in names], axis=1)
    return np.where(np.isnan(mat), -np.inf, mat)


def combined_p(cal: Calibration, names: list[str], scores: dict[str, np.ndarray],
               chunk_elements: int = 20_000_000) -> np.ndarray:
    """Full-conformal p-value of the min-p statistic for each new prompt: ``P(p <= a) <= a`` at any ``n``.

    The min-p statistic of a calibration prompt depends on the other prompts, so comparing a new prompt's
    ``m`` with calibration ``m`` values computed among the calibration prompts alone (each counting itself)
    is anti-conservative at small ``n``. Here every statistic is computed inside the augmented set
    {calibration prompts, the new prompt}, where all ``n + 1`` of them are exchangeable. In units of
    ``1 / (n + 1)``, detector ``d``'s p-value numerator is

    - for the new prompt: ``k_d = 1 + #{j: c_jd >= s_d}``;
    - for calibration prompt ``i``: ``k_id = 1 + #{j != i: c_jd >= c_id} + [s_d >= c_id]``.

    A prompt's statistic is ``(min_d k, sum_d log k)``, compared lexicographically: the min-p rule, with
    ties of the integer ``min`` (every detector's top prompt has ``min = 1``) broken by Fisher's combination
    of the same p-values, so the test stays exact rather than conservative. Then
    ``p = (1 + #{i: statistic_i <= statistic_new}) / (n + 1)``. With one detector this equals
    :func:`upper_tail_p`. Cost: ``n x D`` comparisons per new prompt, in chunks of ``chunk_elements``.
    """
    c = _aligned(cal, names)
    n, d = c.shape
    s = np.stack([np.asarray(scores[k], dtype=np.float64) for k in names], axis=1)
    s = np.where(np.isnan(s), -np.inf, s)
    sorted_cols = [np.sort(c[:, k]) for k in range(d)]
    # leave-one-out counts among the calibration prompts: 1 + #{j != i: c_jd >= c_id} = #{j: c_jd >= c_id}
    base = np.stack([n - np.searchsorted(sorted_cols[k], c[:, k], side="left") for k in range(d)], axis=1)
    k_new = np.stack([1 + n - np.searchsorted(sorted_cols[k], s[:, k], side="left") for k in range(d)], axis=1)
    m_new, f_new = k_new.min(axis=1), np.log(k_new).sum(axis=1)
    out = np.empty(len(s))
    step = max(1, chunk_elements // max(1, n * d))
    for a in range(0, len(s), step):
        counts = base[None, :, :] + (s[a:a + step, None, :] >= c[None, :, :])  # (B, n, D)
        m_cal, f_cal = counts.min(axis=2), np.log(counts).sum(axis=2)
        m_b, f_b = m_new[a:a + step, None], f_new[a:a + step, None]
        as_extreme = (m_cal < m_b) | ((m_cal == m_b) & (f_cal <= f_b + 1e-9))
        out[a:a + step] = (1 + as_extreme.sum(axis=1)) / (n + 1)
    return out


def smallest_attainable_p(n: int) -> float:
    """The smallest conformal p-value ``n`` calibration prompts can give: ``1 / (n + 1)``."""
    return 1.0 / (n + 1)


def check_attainable(cal: Calibration, names: list[str], fpr: float, what: str = "--calibration") -> int:
    """The number of calibration prompts, or a one-line refusal when it is too small for ``fpr``: below
    ``1 / fpr - 1`` prompts no p-value can reach ``fpr`` and nothing could ever be flagged."""
    n = min(int(np.isfinite(cal.scores[d]).sum()) for d in names)
    if smallest_attainable_p(n) > check_fpr(fpr) + 1e-12:
        raise DiffmemError(f"{what} '{cal.path}' holds {n} ordinary prompts with scores: at FPR {fpr:g} the "
                           f"smallest p-value they allow, 1/(n+1) = {smallest_attainable_p(n):.3g}, is above "
                           f"{fpr:g}, so no prompt could be flagged; calibrate on at least "
                           f"{math.ceil(1 / fpr - 1 - 1e-9)} ordinary prompts or raise --fpr")
    return n


@dataclass
class Flagging:
    """The thresholds used to flag a scan and how the combined flag was made (saved in provenance)."""

    fpr: float
    thresholds: dict[str, float]
    combined_rule: str
    calibration: str
    n_calibration: int
    warnings: list[str]

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def flag(table: pa.Table, cal: Calibration, names: list[str], fpr: float) -> tuple[pa.Table, Flagging]:
    """Add ``flagged_<detector>`` (conformal p-value of that detector ``<= fpr``; null where the score is
    NaN), ``min_p``, ``p_combined`` (:func:`combined_p`) and ``flagged`` (``p_combined <= fpr``) to a scan
    table. For prompts drawn like the calibration prompts each flag's false-positive rate is ``<= fpr`` at
    any number of calibration prompts; on prompts of another kind (a mixed set) it is not guaranteed."""
    n_cal = check_attainable(cal, names, fpr)
    thresholds = {n: detector_threshold(cal.scores[n], fpr) for n in names}
    warnings = []
    if n_cal * fpr < 5:
        warnings.append(f"only {n_cal} calibration prompts: at FPR {fpr:g} the flags hold the rate, but the "
                        f"thresholds rest on the top {max(1, math.floor(fpr * (n_cal + 1)))} ordinary score(s) "
                        f"and vary from one calibration set to another (calibrate on >= {math.ceil(5 / fpr)} "
                        "prompts for a stable threshold)")
    for col in [c for c in table.column_names if c.startswith("flagged") or c in ("min_p", "p_combined")]:
        table = table.drop_columns([col])
    scores = {n: table.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in names}
    for n in names:
        s = scores[n]
        table = table.append_column(f"flagged_{n}", pa.array(np.where(np.isnan(s), False, s > thresholds[n]).tolist(),
                                                             mask=np.isnan(s)))
    p = combined_p(cal, names, scores)
    table = table.append_column("min_p", pa.array(min_p(cal, names, scores), pa.float64()))
    table = table.append_column("p_combined", pa.array(p, pa.float64()))
    table = table.append_column("flagged", pa.array(p <= fpr + 1e-12))
    rule = COMBINED_RULE if len(names) > 1 else "single detector"
    return table, Flagging(fpr, thresholds, rule, cal.path, n_cal, warnings)
