"""Detector evaluation on stored scores: AUROC and TPR at low FPR, with the estimator named.

scikit-learn computes the ROC on raw scores (torchmetrics' binary ROC squashes scores outside [0, 1]
through a sigmoid). Two TPR@FPR estimators are reported because the papers differ:

- ``strict``: the largest TPR among ROC points with FPR strictly below the target (Wen et al. 2024);
- ``closest``: the TPR of the ROC point whose FPR is closest to the target (Jeon, Asthana, Ren).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from diffmem.errors import DiffmemError

FPR_TARGETS = (0.01, 0.001)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float) -> dict[str, float]:
    """TPR at a target FPR by both estimators (see the module docstring), from the full ROC.

    Several ROC points share one FPR where positives tie with each other or sit between two negatives'
    scores (a vertical segment of the curve); a threshold at that FPR reaches the segment's top, so
    ``closest`` takes the highest TPR among the points at the closest FPR, not the first one listed.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    below = fpr < target
    strict = float(tpr[below].max()) if below.any() else 0.0
    gap = np.abs(fpr - target)
    closest = float(tpr[gap == gap.min()].max())
    return {"strict": strict, "closest": closest}


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and TPR@1%/0.1% FPR (both estimators) for binary ``labels`` (1 = memorized)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    n_nan = int((~finite).sum())
    labels, scores = labels[finite], scores[finite]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise DiffmemError(f"need both memorized and ordinary prompts to evaluate; got {n_pos} and {n_neg}")
    out = {"auroc": float(roc_auc_score(labels, scores)), "n_pos": n_pos, "n_neg": n_neg, "n_nan_dropped": n_nan}
    for target in FPR_TARGETS:
        key = f"tpr@{target:g}fpr"
        out[key] = tpr_at_fpr(labels, scores, target)
        if n_neg < 1 / target:
            out[key]["warning"] = f"only {n_neg} negatives: FPR {target:g} is below one false positive"
    return out


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str | None = None,
               legend_outside: bool = False):
    """A matplotlib figure of ROC curves, one per ``name -> (labels, scores)`` (NaN scores dropped), with a
    log-scaled FPR axis (the low-FPR regime an auditor needs is visible) and each curve's AUROC in the legend;
    ``legend_outside`` puts the legend beside the axes (a wide page), else inside, lower right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6) if legend_outside else (5, 4), dpi=120)
    for name, (labels, scores) in curves.items():
        finite = np.isfinite(scores)
        y, s = np.asarray(labels, bool)[finite], np.asarray(scores)[finite]
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(np.clip(fpr, 1e-4, 1), tpr, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.axvline(0.01, color="gray", lw=0.5, ls="--")
    ax.set_xlabel("false-positive rate (log)")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title)
    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)
    else:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """:func:`roc_figure` of ``curves`` written to a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = roc_figure(curves, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def threshold_at_fpr(ordinary_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold t with share(ordinary > t) <= fpr (flag = score > t)."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    s = np.sort(np.asarray(ordinary_scores, dtype=np.float64)[np.isfinite(ordinary_scores)])[::-1]
    if len(s) == 0:
        raise DiffmemError("no finite scores among the reference prompts to calibrate on")
    k = int(np.floor(fpr * len(s)))
    return float(s[min(k, len(s) - 1)])
