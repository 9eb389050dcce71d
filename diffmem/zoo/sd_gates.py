"""The SD-like zoo's after-training gates (issue #11; docs/zoo-sd.md, training plan step 6).

What a user of Stable Diffusion sees, measured on the trained zoo:

- **diversity**: an ordinary caption's generations differ across seeds (mean pairwise SSIM <= 0.5), a memorized
  (signature, duplicated >= 16x) caption's repeat (>= 0.9) (:func:`caption_diversity`);
- **memorization only by duplication**: the memorized fraction (extraction labels,
  :func:`~diffmem.zoo.sd_labels.label_sd_zoo`) rises with the replication rate, >= 90% at 16x and 64x, <= 10% at
  1x; never-trained look-alike titles <= 5%; ordinary captions no more often than the labeller's own false-flag
  rate allows (one-sided binomial at 5%, :func:`null_aware_gate`; <= 1% without that rate); template captions
  reproduce their
  template (>= 50%, Webster 2023's template verbatim: a target of this module, the issue names none);
- **fidelity**: every factor an ordinary caption names read back by the SD attribute reader in >= 85% of
  generations (:func:`~diffmem.zoo.sd_attributes.fidelity`).

Every gate is ``{"value", "target", "pass"}`` (:func:`gate`); :func:`sd_gates` assembles them from label rows,
diversity and fidelity. ``benchmarks/zoo_gates.py`` chooses the captions and writes the JSON.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import binom

from diffmem.eval.similarity import pairwise_ssim
from diffmem.models.model import DiffusionModel
from diffmem.zoo.attributes import AttributeReader
from diffmem.zoo.labels import LabelConfig, generate
from diffmem.zoo.sd_attributes import fidelity
from diffmem.zoo.sd_corpus import SDItem

_OPS = {"<=": operator.le, ">=": operator.ge}


def gate(value: float | None, op: str, bound: float) -> dict:
    """One gate: its measured ``value``, the ``target`` as text (``"<= 0.5"``) and whether it passes (a gate with
    nothing measured, ``value`` None, fails)."""
    passed = value is not None and bool(_OPS[op](value, bound))
    return {"value": None if value is None else round(float(value), 4), "target": f"{op} {bound}", "pass": passed}


def mean_pairwise_ssim(images: torch.Tensor) -> float:
    """Mean SSIM over all pairs of ``images`` (one caption's generations across seeds): about 1 when a caption
    always gives the same picture, low when its seeds give different pictures."""
    return float(pairwise_ssim(images, len(images))[0])


def caption_diversity(model: DiffusionModel, items: Sequence[SDItem], cfg: LabelConfig, progress: bool = True
                      ) -> tuple[np.ndarray, torch.Tensor]:
    """Generate ``cfg.seeds_per_prompt`` images of each caption (as labelling does) and return each caption's
    mean pairwise SSIM and the generations."""
    gen = generate(model, list(items), cfg, progress)
    return pairwise_ssim(gen, cfg.seeds_per_prompt), gen


def named_fidelity(reader: AttributeReader, gen: torch.Tensor, items: Sequence[SDItem], k: int) -> dict[str, float]:
    """:func:`~diffmem.zoo.sd_attributes.fidelity` of ``k`` generations per ordinary caption against its named
    factors: ``all`` (every named factor read back) and each factor's read-back rate."""
    return fidelity(reader, gen, [it.named for it in items for _ in range(k)])


def _fraction(rows: list[dict], **match: object) -> float | None:
    sel = [r["memorized"] for r in rows if all(r[key] == value for key, value in match.items())]
    return float(np.mean(sel)) if sel else None


# the gates that bound a memorized fraction from above: (name, which label rows, bound)
UPPER_BOUND_GATES: tuple[tuple[str, dict[str, object], float], ...] = (
    ("memorized_1x", {"kind": "signature", "replication": 1}, 0.1),
    ("lookalike_titles", {"kind": "heldout_signature"}, 0.05),
    ("ordinary_captions", {"kind": "generic"}, 0.01),
)


def null_exceedance(count: int, n: int, null_rate: float, bound: float) -> dict:
    """How an upper-bound memorization gate ("memorized fraction <= ``bound``" over ``n`` captions, ``count``
    flagged) reads against the labeller's own false positives.

    The labeller flags a caption when its statistic exceeds the ``null_quantile`` of what an ideal generaliser
    scores (:func:`~diffmem.zoo.labels.null_thresholds`), so even a model that only generalised flags each
    caption with probability ``null_rate = 1 - null_quantile``. Taking captions as independent, the flagged count
    under that null is Binomial(n, null_rate): ``expected_under_null`` is its mean, ``p_fail_under_null`` the
    chance it exceeds what the gate allows (``floor(bound n)``), ``p_at_least_observed_under_null`` the chance of
    ``count`` or more. A gate whose ``p_fail_under_null`` is large cannot tell a memorizing model from the
    labeller's noise; its value is then read with these numbers beside it."""
    if not 0 <= count <= n or n == 0 or not 0 <= null_rate <= 1:
        raise ValueError(f"expected 0 <= count <= n, n > 0 and a rate in [0, 1]; got {count}, {n}, {null_rate}")
    allowed = math.floor(bound * n + 1e-9)
    return {"count": count, "n": n, "allowed": allowed, "null_rate": round(null_rate, 6),
            "expected_under_null": round(n * null_rate, 4),
            "p_fail_under_null": round(float(binom.sf(allowed, n, null_rate)), 4),
            "p_at_least_observed_under_null": round(float(binom.sf(count - 1, n, null_rate)), 4) if count else 1.0}


def null_aware_gate(count: int, n: int, null_rate: float, alpha: float = 0.05) -> dict:
    """The ordinary-caption gate read against the labeller's own false-flag rate: it fails only when more
    captions are flagged than chance allows, a one-sided binomial test at ``alpha``
    (``P(Binomial(n, null_rate) >= count) < alpha``). A fixed "<= 1%" bound at the labeller's 1% null rate fails
    a model that only generalises in about 43% of builds (147 captions); this fails it in at most ``alpha``."""
    p = float(binom.sf(count - 1, n, null_rate)) if count else 1.0
    allowed = next(c for c in range(n + 1) if binom.sf(c, n, null_rate) < alpha)  # P(>= c + 1) < alpha
    return {"value": round(count / n, 4), "target": f"not above the labeller's null: one-sided binomial at {alpha:g}",
            "pass": p >= alpha, "count": count, "n": n, "allowed": allowed, "null_rate": round(null_rate, 6),
            "p_at_least_observed_under_null": round(p, 4)}


def null_from_summary(labels: dict) -> dict[str, dict]:
    """Each upper-bound gate's ``null`` (:func:`null_exceedance`) recomputed from a gates file's label summary
    (``labels`` of ``benchmarks/zoo_gates.py``: ``by_kind``, ``signature_by_replication`` and the labeller's
    ``label_config``), for files written before :func:`sd_gates` stored it. Counts are the stored fractions times
    their ``n`` (fractions kept to 4 decimals: exact for n below 5,000)."""
    rate = 1 - float(labels["label_config"]["null_quantile"])
    out = {}
    for name, match, bound in UPPER_BOUND_GATES:
        if "replication" in match:
            summary = labels.get("signature_by_replication", {}).get(str(match["replication"]))
        else:
            summary = labels.get("by_kind", {}).get(str(match["kind"]))
        if summary and summary["n"]:
            out[name] = null_exceedance(round(summary["memorized"] * summary["n"]), summary["n"], rate, bound)
    return out


def _count(rows: list[dict], **match: object) -> tuple[int, int]:
    sel = [bool(r["memorized"]) for r in rows if all(r[key] == value for key, value in match.items())]
    return sum(sel), len(sel)


def memorized_by_rate(rows: list[dict]) -> dict[int, float]:
    """Memorized fraction of signature captions per replication rate."""
    rates = sorted({r["replication"] for r in rows if r["kind"] == "signature"})
    return {rate: frac for rate in rates if (frac := _fraction(rows, kind="signature", replication=rate)) is not None}


def sd_gates(rows: list[dict], ordinary_ssim: np.ndarray, memorized_ssim: np.ndarray,
             fid: dict[str, float], null_rate: float | None = None) -> dict[str, dict]:
    """Every after-training gate from label rows (:func:`~diffmem.zoo.sd_labels.label_sd_zoo`), per-caption mean
    pairwise SSIM of ordinary and memorized captions, and named-factor fidelity (:func:`named_fidelity`). With
    the labeller's per-caption ``null_rate``, each upper-bound memorization gate (1x, look-alikes, ordinary
    captions) also carries ``null``: how often the labeller alone would fail it (:func:`null_exceedance`)."""
    by_rate = memorized_by_rate(rows)
    fractions = [by_rate[r] for r in sorted(by_rate)]
    rising = all(b >= a for a, b in zip(fractions, fractions[1:]))
    upper = {name: gate(_fraction(rows, **match), "<=", bound) for name, match, bound in UPPER_BOUND_GATES}
    gates = {
        "diversity_ordinary": gate(float(np.mean(ordinary_ssim)) if len(ordinary_ssim) else None, "<=", 0.5),
        "diversity_memorized": gate(float(np.mean(memorized_ssim)) if len(memorized_ssim) else None, ">=", 0.9),
        "memorized_1x": upper["memorized_1x"],
        **{f"memorized_{rate}x": gate(by_rate.get(rate), ">=", 0.9) for rate in (16, 64)},
        "memorized_rises_with_rate": {"value": {str(r): round(v, 4) for r, v in by_rate.items()},
                                      "target": "non-decreasing in the rate", "pass": bool(rising and fractions)},
        "lookalike_titles": upper["lookalike_titles"],
        "ordinary_captions": upper["ordinary_captions"],
        "named_fidelity": gate(fid.get("all"), ">=", 0.85),
        "template": gate(_fraction(rows, kind="template"), ">=", 0.5),
    }
    for factor, value in fid.items():
        if factor != "all":
            gates[f"named_fidelity_{factor}"] = gate(value, ">=", 0.85)
    if null_rate is not None:
        for name, match, bound in UPPER_BOUND_GATES:
            count, n = _count(rows, **match)
            if n:
                gates[name]["null"] = null_exceedance(count, n, null_rate, bound)
        count, n = _count(rows, kind="generic")
        if n:  # nothing memorized beyond chance flags, as a test rather than a bound at the null rate itself
            gates["ordinary_captions"] = {**null_aware_gate(count, n, null_rate),
                                          "null": gates["ordinary_captions"]["null"]}
    return gates


def diversity_config(cfg: LabelConfig, seeds: int) -> LabelConfig:
    """``cfg`` with ``seeds`` generations per caption and seeds disjoint from labelling's (offset by 10^9)."""
    return dataclasses.replace(cfg, seeds_per_prompt=seeds, seed_offset=cfg.seed_offset + 10**9)
