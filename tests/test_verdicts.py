"""Verdicts with a stated error rate: hand-computed nulls, p-values and q-values, the FDR held on a simulated
pure generaliser, and planted replicators found at the power the binomial promises."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from diffmem.errors import DiffmemError
from diffmem.eval.verdicts import (
    attribution,
    bh_cut,
    bh_q_values,
    binomial_p,
    count_bound,
    decide,
    fit_generation_null,
    null_overdispersion,
    null_self_check,
)


def test_generation_null_by_hand():
    sims = np.arange(100) / 100  # 0.00 .. 0.99, N = 100
    null = fit_generation_null(sims, level=0.05)
    # r = floor(0.05 * 101) - 1 = 4: tau is the 5th largest (0.95), 4 above it -> pi0 = (1 + 4) / 101
    assert null.threshold == pytest.approx(0.95) and null.rate == pytest.approx(5 / 101) and null.n == 100
    null = fit_generation_null(sims, level=0.01)  # r = 0: tau = the largest, none above: pi0 = 1 / 101
    assert null.threshold == pytest.approx(0.99) and null.rate == pytest.approx(1 / 101)
    with pytest.raises(DiffmemError, match="98 similarities, expected at least 99"):
        fit_generation_null(sims[:98], level=0.01)


def test_the_null_rate_is_exact_for_a_fresh_null_generation():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(2000):
        null = fit_generation_null(rng.normal(size=199), level=0.02)  # r = 3: pi0 = 4/200 = 0.02
        hits.append(rng.normal() > null.threshold)
    assert null.rate == pytest.approx(0.02)
    assert np.mean(hits) == pytest.approx(0.02, abs=3 * np.sqrt(0.02 * 0.98 / 2000))


def test_binomial_p_and_bh_by_hand():
    # one chance match in 16 at pi0 = 0.01: 1 - 0.99^16; none: 1; two: 1 - P(0) - P(1)
    p = binomial_p(np.array([1, 0, 2]), 16, 0.01)
    assert p[0] == pytest.approx(1 - 0.99**16) and p[1] == 1.0
    assert p[2] == pytest.approx(1 - 0.99**16 - 16 * 0.01 * 0.99**15)
    pv = np.array([0.01, 0.04, 0.03, 0.5])
    # sorted .01 .03 .04 .5 against q i / m = .0125 .025 .0375 .05: only the first passes
    assert bh_cut(pv, 0.05) == pytest.approx(0.0125)
    assert bh_q_values(pv).tolist() == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    bound = count_bound(pv, 0.05)
    assert bound.replicating == 1 and bound.tested == 4
    assert bound.lower == 1 - int(stats.binom.ppf(0.95, 4, 0.01))  # at the largest p called, 0.01


def test_decide_by_hand():
    null = fit_generation_null(np.arange(100) / 100, level=0.05)  # tau 0.95, pi0 5/101
    sim = np.array([[0.99, 0.98, 0.97, 0.96], [0.99, 0.1, 0.1, 0.1], [0.5, 0.5, np.nan, np.nan]])
    v = decide(sim, null, q=0.05)
    assert v.matches.tolist() == [4, 1, 0] and v.k.tolist() == [4, 4, 2]
    assert v.replication_rate.tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert v.p_value[0] == pytest.approx((5 / 101) ** 4) and v.p_value[1] == pytest.approx(1 - (96 / 101) ** 4)
    assert v.replicates.tolist() == [True, False, False]  # one match in 4 is what chance gives
    assert v.margin.tolist() == pytest.approx([0.04, 0.04, -0.45])


def _simulate(m_null: int, m_rep: int, rep_rate: float, k: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A model's best-match similarities: null prompts' generations are N(0, 1) (a pure generaliser); a
    replicating prompt's generation is a copy (similarity 5) with probability ``rep_rate``."""
    rng = np.random.default_rng(seed)
    null_fit = rng.normal(size=(300, k))  # held-out prompts: 4,800 null generations
    sim = rng.normal(size=(m_null + m_rep, k))
    copies = rng.random((m_rep, k)) < rep_rate
    sim[m_null:][copies] = 5.0
    return null_fit, sim


def test_fdr_holds_on_a_simulated_pure_generaliser():
    """No prompt replicates: any verdict is false, so FDR = P(any verdict) must be <= q (BH under
    independence). 300 simulated audits of 400 prompts x 16 generations."""
    q, runs = 0.05, 300
    any_verdict = []
    for seed in range(runs):
        null_fit, sim = _simulate(400, 0, 0.0, seed=seed)
        any_verdict.append(decide(sim, fit_generation_null(null_fit), q).replicates.any())
    fdr = float(np.mean(any_verdict))
    assert fdr <= q + 3 * np.sqrt(q * (1 - q) / runs)


@pytest.mark.parametrize(("rate", "power"), [(0.5, 0.99), (0.25, 0.75)])
def test_planted_replicators_are_found_at_the_binomial_power_with_fdr_held(rate, power):
    """40 planted replicators among 360 never-trained prompts, copying in ``rate`` of 16 seeds: found at
    ``power`` or more, and the share of false verdicts stays <= q on average. (At rate 0.25 about 40 of 400
    are called, the BH cut is near 0.005, so 3 of 16 matches are needed: P(Binomial(16, 0.26) >= 3) = 0.83.)"""
    q, fdp, found = 0.05, [], []
    for seed in range(100):
        null_fit, sim = _simulate(360, 40, rate, seed=seed)
        v = decide(sim, fit_generation_null(null_fit), q)
        r = v.replicates
        fdp.append(r[:360].sum() / max(r.sum(), 1))
        found.append(r[360:].mean())
    assert np.mean(fdp) <= q
    assert np.mean(found) >= power


def test_attribution_says_unknown_when_the_own_item_is_not_given():
    assert attribution([[3], [3, 4], [4], [], [7]], [3, 3, 3, 3, None]) == ["own", "both", "other", "none", "unknown"]


def test_null_checks_see_a_prompt_level_effect():
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(400, 16))
    null = fit_generation_null(clean)
    ok = null_overdispersion(clean, null)
    assert ok["with_2_or_more_matches"] <= 2 * ok["expected_with_2_or_more"] + 3
    assert null_self_check(clean)["called_replicating"] == 0
    lumpy = clean.copy()
    lumpy[:20] += 3.0  # 20 never-trained prompts close to a training image in every seed
    bad = null_overdispersion(lumpy, fit_generation_null(lumpy))
    assert bad["p_excess"] < 1e-3


def test_a_null_trimmed_of_replicating_null_prompts_keeps_tau_at_chance():
    """Three never-trained prompts that copy in most seeds (look-alikes) would lift tau to copy level; the
    trimmed null leaves exactly them out and its tau is the clean null's, and it judges each of them against
    the others (leave one out) as replicating."""
    from diffmem.eval.verdicts import trimmed_null

    rng = np.random.default_rng(2)
    clean = rng.normal(size=(150, 16))
    lumpy = clean.copy()
    lumpy[:3, :12] = 5.0  # 36 copies among 2,400 null generations: above the 1% tail's 24
    assert fit_generation_null(lumpy).threshold == 5.0  # the untrimmed null calls a copy chance
    t = trimmed_null(lumpy)
    assert t.kept.tolist() == [False] * 3 + [True] * 147
    assert t.null.threshold == fit_generation_null(clean[3:]).threshold
    assert (t.crossfit.matches[:3] == 12).all() and (t.crossfit.p_value[:3] < 1e-10).all()
    assert trimmed_null(clean).kept.all()  # nothing to trim in a clean null
