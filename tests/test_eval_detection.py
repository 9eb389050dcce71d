"""Detector evaluation (diffmem.eval.detection) against hand-computed values."""

import numpy as np
import pytest

from diffmem.errors import DiffmemError
from diffmem.eval.detection import detection_metrics, threshold_at_fpr, tpr_at_fpr

# four ordinary prompts, four memorized; one memorized score (0.35) sits below the top negative (0.4)
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.5, 0.6, 0.7])


def test_tpr_at_fpr_by_hand():
    # ROC points (fpr, tpr): (0, 0) (0, .25) (0, .5) (0, .75) (.25, .75) (.25, 1) (.5, 1) (.75, 1) (1, 1)
    assert tpr_at_fpr(LABELS, SCORES, 0.1) == {"strict": 0.75, "closest": 0.75}
    assert tpr_at_fpr(LABELS, SCORES, 0.3) == {"strict": 1.0, "closest": 1.0}
    # FPR 0.25 is not strictly below 0.25: strict stays on the FPR-0 points; closest is exactly there
    assert tpr_at_fpr(LABELS, SCORES, 0.25) == {"strict": 0.75, "closest": 1.0}


def test_closest_takes_the_top_of_a_vertical_roc_segment_on_ties():
    # three memorized prompts tie at the top score: the ROC jumps from (0, 0) to (0, .75) in one threshold;
    # the FPR closest to 1% is 0, where a threshold reaches TPR 0.75 (taking the first point gave 0)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.9, 0.9, 0.2, 0.8, 0.1, 0.05, 0.0])
    assert tpr_at_fpr(labels, scores, 0.01) == {"strict": 0.75, "closest": 0.75}


def test_a_positive_tied_with_a_negative_moves_both_rates_at_once():
    labels = np.array([1, 1, 0, 0, 0, 0])
    scores = np.array([0.5, 0.5, 0.5, 0.1, 0.2, 0.3])
    # points (0, 0) and (.25, 1): strict below .2 has only (0, 0); closest to .2 is FPR .25 (gap .05 < .2)
    assert tpr_at_fpr(labels, scores, 0.2) == {"strict": 0.0, "closest": 1.0}


def test_detection_metrics_by_hand():
    m = detection_metrics(LABELS, SCORES)
    # 15 of the 16 (memorized, ordinary) pairs are ordered right: 0.35 < 0.4 is the one exception
    assert m["auroc"] == pytest.approx(15 / 16)
    assert (m["n_pos"], m["n_neg"], m["n_nan_dropped"]) == (4, 4, 0)
    m = detection_metrics(np.append(LABELS, 1), np.append(SCORES, np.nan))
    assert m["n_nan_dropped"] == 1 and m["auroc"] == pytest.approx(15 / 16)
    assert m["tpr@0.01fpr"]["strict"] == 0.75 and "warning" in m["tpr@0.01fpr"]
    with pytest.raises(DiffmemError, match="both memorized and ordinary"):
        detection_metrics(np.ones(3), np.arange(3.0))


def test_threshold_at_fpr_by_hand():
    s = np.arange(1.0, 11.0)  # 1..10
    assert threshold_at_fpr(s, 0.1) == 9.0  # only 10 > 9: 1 of 10 flagged
    assert threshold_at_fpr(s, 0.25) == 8.0  # floor(2.5) = 2 flagged: 9, 10
    assert threshold_at_fpr(s, 0.05) == 10.0  # no false positive allowed
    assert threshold_at_fpr(np.array([5.0, 5.0, 5.0, 1.0]), 0.5) == 5.0  # ties: any lower t flags 3 of 4
    assert threshold_at_fpr(np.array([np.nan, 3.0, 2.0, 1.0]), 0.4) == 2.0  # NaN dropped: 3 finite, 1 flagged
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(s, 0.0)
    with pytest.raises(DiffmemError, match="no finite"):
        threshold_at_fpr(np.array([np.nan]), 0.1)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.3])
def test_threshold_holds_the_fpr_and_is_the_smallest_that_does(fpr):
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=500), 1)  # many ties
    t = threshold_at_fpr(s, fpr)
    assert (s > t).mean() <= fpr
    assert (s > np.nextafter(t, -np.inf)).mean() > fpr
