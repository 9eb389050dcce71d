"""Verdicts with a stated error rate: which prompts replicate training images beyond what chance gives.

A generation *matches* when its best similarity to the training set exceeds a threshold ``tau``; a prompt
*replicates* when more of its ``k`` generations match than a model that never saw its image would produce.
The decision has three parts, each a standard, checkable step:

1. **Per-generation null** (:class:`GenerationNull`). ``tau`` is set on the *model's own generations* of
   prompts it was not trained on (held-out prompts of the same kind; for the zoos, never-trained captions of
   the same family): the ``(r + 1)``-th largest of ``N`` null similarities, ``r = floor(level (N + 1)) - 1``.
   For a new null generation exchangeable with them, ``P(similarity > tau) = (1 + #{null > tau}) / (N + 1)``
   exactly (the conformal rank argument; Angelopoulos & Bates 2021): that is the per-generation null rate
   ``pi0`` used below, not the nominal ``level``.
2. **Per-prompt test.** With ``x`` of ``k`` generations matching, ``p = P(Binomial(k, pi0) >= x)``
   (``scipy.stats.binom.sf``). A single chance match among ``k = 16`` at ``pi0 = 0.01`` gives ``p = 0.149``:
   it is never a verdict on its own.
3. **Across prompts**: Benjamini-Hochberg at ``q`` (``scipy.stats.false_discovery_control``); a prompt
   replicates when its BH-adjusted p-value (its q-value) is ``<= q``. The expected share of false verdicts
   among the prompts called replicating is then ``<= q``.

What the null assumes, and when it does not hold:
- the null prompts are drawn like the tested prompts *would be if they had not been trained on* (same
  family, same length and style); prompts that describe a training image closely without being its caption
  (templates, near-paraphrases) can match it for a generalising model too, and are then flagged as
  replicating, correctly for an auditor (the model reproduces the image) but not proof of memorization of
  that caption;
- the ``k`` generations of one prompt are independent given the prompt (seeds differ). If some never-trained
  prompts match in many seeds (a prompt-level effect), the binomial understates their tail: the check
  :func:`null_self_check` runs the whole procedure on held-out null prompts and reports how many it calls
  replicating (expected: none at ``q``), and :func:`null_overdispersion` compares the null prompts' match
  counts with the binomial.

The count comes with a bound (:func:`count_bound`): of ``R`` prompts called replicating, at least
``R - V`` are true with confidence ``c``, where ``V`` is the ``c``-quantile of ``Binomial(m, t)`` and ``t``
the largest p-value among the ``R`` (false verdicts among ``m`` prompts: each never-trained one passes ``t``
with probability ``<= t``; ``t`` is treated as fixed, so the bound is approximate where ``R`` is small).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from diffmem.errors import DiffmemError

DEFAULT_Q = 0.05
DEFAULT_NULL_LEVEL = 0.01
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class GenerationNull:
    """The per-generation match threshold and the exact null rate of exceeding it."""

    threshold: float  # tau: a generation matches when its similarity is > tau
    rate: float  # pi0 = (1 + #{null > tau}) / (N + 1)
    n: int  # null generations
    level: float  # the nominal tail level asked for
    median: float  # of the null similarities (for reading margins)

    def describe(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fit_generation_null(null_similarity: np.ndarray, level: float = DEFAULT_NULL_LEVEL,
                        what: str = "null generations") -> GenerationNull:
    """``tau`` and ``pi0`` from the best-match similarities of never-trained prompts' generations.

    Refuses fewer than ``1 / level - 1`` finite values: below that no threshold reaches ``level``."""
    if not 0 < level < 1:
        raise DiffmemError(f"the null level must be between 0 and 1 (exclusive), got {level!r}")
    s = np.asarray(null_similarity, dtype=np.float64).ravel()
    s = np.sort(s[np.isfinite(s)])[::-1]
    need = math.ceil(1 / level - 1 - 1e-9)
    if len(s) < need:
        raise DiffmemError(f"{what}: {len(s)} similarities, expected at least {need} for a per-generation "
                           f"null level of {level:g} (more null prompts or generations)")
    r = int(math.floor(level * (len(s) + 1) + 1e-9)) - 1
    tau = float(s[r])
    rate = (1 + int((s > tau).sum())) / (len(s) + 1)
    return GenerationNull(tau, rate, len(s), level, float(np.median(s)))


def binomial_p(matches: np.ndarray, k: np.ndarray | int, rate: float | np.ndarray) -> np.ndarray:
    """``P(Binomial(k, rate) >= matches)``: 1 where nothing matched."""
    x = np.asarray(matches, dtype=np.int64)
    return np.where(x <= 0, 1.0, stats.binom.sf(x - 1, k, rate))


def bh_q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN p-values are left out and stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def bh_cut(p: np.ndarray, q: float) -> float:
    """The BH p-value cut ``t = q r / m`` (``r`` the number rejected); 0 when nothing is rejected."""
    p = np.sort(np.asarray(p, dtype=np.float64)[np.isfinite(p)])
    m = len(p)
    passed = np.nonzero(p <= q * np.arange(1, m + 1) / max(m, 1))[0]
    return float(q * (passed[-1] + 1) / m) if len(passed) else 0.0


@dataclass(frozen=True)
class CountBound:
    """``replicating`` prompts called at FDR ``q``; at least ``lower`` of them true with ``confidence``."""

    replicating: int
    lower: int
    expected_false_at_most: float
    confidence: float
    tested: int
    q: float
    cut: float

    def sentence(self) -> str:
        return (f"{self.replicating} of {self.tested} prompts replicate training images at FDR {self.q:g} "
                f"(at most {self.expected_false_at_most:.1f} false expected; at least {self.lower} true with "
                f"{self.confidence:.0%} confidence)")


def count_bound(p: np.ndarray, q: float = DEFAULT_Q, confidence: float = DEFAULT_CONFIDENCE) -> CountBound:
    """The verdict count with its bound (module docstring)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[np.isfinite(p)]
    t = bh_cut(p, q)
    called = p[p <= t] if t > 0 else p[:0]
    v = int(stats.binom.ppf(confidence, len(p), called.max())) if len(called) else 0
    return CountBound(len(called), max(0, len(called) - v), q * len(called), confidence, len(p), q, t)


@dataclass(frozen=True)
class Verdicts:
    """Per prompt: matching generations, replication rate, p-value, q-value, verdict, margin."""

    matches: np.ndarray  # generations over tau
    k: np.ndarray  # generations scored
    replication_rate: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    replicates: np.ndarray  # bool: q <= q level
    margin: np.ndarray  # best similarity - tau
    bound: CountBound


@dataclass(frozen=True)
class PromptTests:
    """Per prompt, before the correction across prompts: matches, generations scored, p-value, margin."""

    matches: np.ndarray
    k: np.ndarray
    p_value: np.ndarray
    margin: np.ndarray  # best similarity - tau

    @property
    def replication_rate(self) -> np.ndarray:
        return np.where(self.k > 0, self.matches / np.maximum(self.k, 1), np.nan)


def prompt_tests(similarity: np.ndarray, null: GenerationNull | list[GenerationNull]) -> PromptTests:
    """The binomial test of every prompt whose generations have best-match ``similarity`` ``(m, k)`` (NaN: not
    scored); ``null`` is one :class:`GenerationNull` for all prompts or one per prompt (per family)."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be (prompts, generations), got shape {sim.shape}")
    nulls = null if isinstance(null, list) else [null] * len(sim)
    if len(nulls) != len(sim):
        raise ValueError(f"got {len(nulls)} nulls for {len(sim)} prompts")
    tau = np.array([n.threshold for n in nulls])
    rate = np.array([n.rate for n in nulls])
    scored = np.isfinite(sim)
    k = scored.sum(1)
    x = (np.where(scored, sim, -np.inf) > tau[:, None]).sum(1)
    p = np.where(k > 0, binomial_p(x, np.maximum(k, 1), rate), np.nan)
    best = np.where(k > 0, np.max(np.where(scored, sim, -np.inf), axis=1, initial=-np.inf), np.nan)
    return PromptTests(x, k, p, best - tau)


def decide(similarity: np.ndarray, null: GenerationNull | list[GenerationNull], q: float = DEFAULT_Q,
           confidence: float = DEFAULT_CONFIDENCE) -> Verdicts:
    """Verdicts: :func:`prompt_tests`, then Benjamini-Hochberg at ``q`` across all the prompts given."""
    t = prompt_tests(similarity, null)
    qv = bh_q_values(t.p_value)
    return Verdicts(t.matches, t.k, t.replication_rate, t.p_value, qv, np.nan_to_num(qv, nan=1.0) <= q, t.margin,
                    count_bound(t.p_value, q, confidence))


@dataclass(frozen=True)
class TrimmedNull:
    """A per-generation null fitted on the never-trained prompts that do not themselves replicate.

    ``kept`` marks the null prompts it was fitted on; ``crossfit`` judges every null prompt (its first ``k``
    generations) against a null fitted on the *other* kept prompts (leave one prompt out), so no prompt is part
    of its own null; ``iterations`` is how many refits it took to settle."""

    null: GenerationNull
    kept: np.ndarray
    crossfit: PromptTests
    iterations: int


def _leave_one_out(sim: np.ndarray, kept: np.ndarray, level: float, k: int, what: str) -> PromptTests:
    """Every null prompt (its first ``k`` generations) tested against a null fitted on the other kept prompts."""
    tests = [prompt_tests(sim[i:i + 1, :k], fit_generation_null(sim[kept & (np.arange(len(sim)) != i)], level,
                                                                f"{what} but one")) for i in range(len(sim))]
    return PromptTests(*(np.concatenate([getattr(t, f) for t in tests]) for f in ("matches", "k", "p_value", "margin")))


def trimmed_null(null_similarity: np.ndarray, level: float = DEFAULT_NULL_LEVEL, q: float = DEFAULT_Q,
                 k: int | None = None, screen_level: float = 0.1, max_iterations: int = 5,
                 what: str = "null prompts") -> TrimmedNull:
    """The null, trimmed of null prompts that replicate (Efron's empirical null: fit the null on the bulk, not
    on the discoveries).

    Never-trained prompts can reproduce a training image too (a look-alike title reproducing a template): a few
    such prompts put their copies in the null's upper tail and lift ``tau`` to copy level, so the null would call
    real copies chance (measured on the default zoo: two look-alikes matching in 11 and 12 of 16 seeds lifted
    the painting family's ``tau`` from 0.54 to 0.93). Copy-level ``tau`` also hides each replicating null prompt
    behind the others (masking), so a first screen runs at ``screen_level`` (10%: a tail wider than the copies
    unless a tenth of all null generations are copies). Then each round judges every null prompt against a null
    fitted on the other kept prompts at ``level``, applies BH at ``q`` among the null prompts, keeps those not
    called replicating, and refits, until the kept set stops changing (at most ``max_iterations`` rounds)."""
    sim = np.asarray(null_similarity, dtype=np.float64)
    k = sim.shape[1] if k is None else k
    everyone = np.ones(len(sim), dtype=bool)
    screen = _leave_one_out(sim, everyone, max(level, screen_level), k, what)
    kept = np.nan_to_num(bh_q_values(screen.p_value), nan=1.0) > q
    rounds = 0
    while rounds < max_iterations:
        rounds += 1
        crossfit = _leave_one_out(sim, kept, level, k, what)
        new_kept = np.nan_to_num(bh_q_values(crossfit.p_value), nan=1.0) > q
        if np.array_equal(new_kept, kept):
            break
        kept = new_kept
    return TrimmedNull(fit_generation_null(sim[kept], level, what), kept, crossfit, rounds)


def matched_items(items, similarity: np.ndarray, tau: float) -> list[int]:
    """The training items a prompt's generations matched: those whose similarity is above ``tau``."""
    return sorted({int(it) for it, sv in zip(items, similarity) if np.isfinite(sv) and sv > tau})


def attribution(matched_items: list[list[int]], own_items: list[int | None]) -> list[str]:
    """Whose image a replicating prompt reproduces: ``own`` (its own training image: verbatim), ``other``
    (another caption's: template or retrieval), ``both``, ``unknown`` (own item not given) or ``none``."""
    out = []
    for items, own in zip(matched_items, own_items):
        if not items:
            out.append("none")
        elif own is None:
            out.append("unknown")
        else:
            has_own, has_other = own in items, any(i != own for i in items)
            out.append("both" if has_own and has_other else "own" if has_own else "other")
    return out


def null_overdispersion(null_similarity: np.ndarray, null: GenerationNull) -> dict:
    """How the never-trained prompts' match counts compare with ``Binomial(k, pi0)``: the share of null
    prompts with >= 2 matches, observed against expected (a prompt-level effect shows as excess)."""
    sim = np.asarray(null_similarity, dtype=np.float64)
    k = np.isfinite(sim).sum(1)
    x = (np.where(np.isfinite(sim), sim, -np.inf) > null.threshold).sum(1)
    expected = float(np.mean(stats.binom.sf(1, k, null.rate)))
    return {"prompts": int(len(sim)), "with_2_or_more_matches": int((x >= 2).sum()),
            "expected_with_2_or_more": round(expected * len(sim), 3),
            "p_excess": float(stats.binom.sf((x >= 2).sum() - 1, len(sim), expected)) if (x >= 2).any() else 1.0}


def null_self_check(null_similarity: np.ndarray, level: float = DEFAULT_NULL_LEVEL, q: float = DEFAULT_Q,
                    seed: int = 0) -> dict:
    """The procedure run on never-trained prompts alone: half of them (by prompt) fit the null, the other half
    are judged. Every verdict there is false, so a count above 0 (beyond chance ``q``) says the null does not
    hold for these prompts."""
    sim = np.asarray(null_similarity, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(sim))
    fit, judged = order[: len(sim) // 2], order[len(sim) // 2:]
    null = fit_generation_null(sim[fit], level, "the null self-check's half")
    v = decide(sim[judged], null, q)
    return {"judged": int(len(judged)), "called_replicating": int(v.replicates.sum()),
            "threshold": round(null.threshold, 6), "rate": round(null.rate, 6)}
