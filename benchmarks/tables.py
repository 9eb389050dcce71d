"""Markdown tables of the README and docs, rendered from the results files in ``benchmarks/results/``.

The docs' tables are pasted from this script's output, and ``tests/test_benchmark_tables.py`` checks
that every row it renders appears verbatim in the page that quotes it, so a figure in the docs cannot
drift from its file. Rounding: 3 decimals for rates and AUROCs (Python's ``format``, round half to
even on the binary value), 1 decimal for seconds, FID to the unit.

    .venv/bin/python benchmarks/tables.py headline             # README: one row per measure, with its file
    .venv/bin/python benchmarks/tables.py detection-heldout-sd # docs/scanning.md (also -duplication, -confirmed)
    .venv/bin/python benchmarks/tables.py bench-heldout-sd     # docs/mitigation.md, docs/bench-task.md
    .venv/bin/python benchmarks/tables.py zoo-gates-current    # docs/zoo-sd.md (zoo-gates: every build, history)
    .venv/bin/python benchmarks/tables.py update-docs          # rewrite every quoted table after a rerun

``PAGES`` says which page quotes which table; ``--help`` lists every table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from diffmem.bench_results import upgrade_result
from diffmem.zoo.sd_gates import null_from_summary

RESULTS = Path(__file__).resolve().parent / "results"


def label(key: str) -> str:
    """A detection result key as the docs name it."""
    if m := re.fullmatch(r"(.+) \(draws=(\d+)\)", key):
        return f"{m[1]}, {m[2]} draws"
    if m := re.fullmatch(r"noise-norm-trajectory \(steps=(\d+), gens=(\d+)\)", key):
        return f"noise-norm-trajectory (first {m[1]} of 50 steps, {m[2]} generations)"
    if m := re.fullmatch(r"(nn-\w+) \(samples=(\d+), (\d+)/(\d+) steps\)", key):
        return f"{m[1]} ({m[2]} seeds, x0 after {m[3]} of {m[4]} steps)"
    return key


def _tpr(m: dict, target: str = "tpr@0.01fpr") -> str:
    return f"{m[target]['strict']:.3f} / {m[target]['closest']:.3f}"


def detection_rows(record: dict, compact: bool = False) -> list[str]:
    if compact:
        head = ["| detector | AUROC | TPR@1%FPR strict / closest | AUROC, stable labels | "
                "TPR@1%FPR, stable labels (strict / closest) |", "|---|---|---|---|---|"]
    else:
        head = ["| detector | AUROC | TPR@1%FPR strict / closest | TPR@0.1%FPR strict / closest | AUROC, scene | "
                "AUROC, stable labels | TPR@1%FPR, stable labels (strict / closest) | UNet calls per prompt |",
                "|---|---|---|---|---|---|---|---|"]
    draws = [int(d) for k in record["results"] for d in re.findall(r"\(draws=(\d+)\)", k)]
    rows = []
    for key, m in record["results"].items():
        if key.startswith("_"):  # timings in records written before they moved to "timings"
            continue
        if compact and f"(draws={min(draws)})" not in key and "(draws=" in key:
            continue  # the README shows the first draw count only
        c = m.get("confident")
        stable = [f"{c['auroc']:.3f}", _tpr(c)] if c else ["-", "-"]
        if compact:
            cells = [label(key), f"{m['auroc']:.3f}", _tpr(m), *stable]
        else:
            scene = m["within_family"].get("scene")
            cells = [label(key), f"{m['auroc']:.3f}", _tpr(m), _tpr(m, "tpr@0.001fpr"),
                     f"{scene:.3f}" if scene is not None else "-", *stable, f"{m['unet_calls_per_prompt']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def previous_detection_rows(record: dict, previous: dict) -> list[str]:
    """Rows of the previous detection run whose detectors the current run did not rescan: AUROC and Wen's
    strict TPR only (the previous run's "closest" TPR came from the estimator fixed since)."""
    head = ["| detector (previous run) | AUROC | TPR@1%FPR strict | AUROC, scene | AUROC, stable labels | "
            "TPR@1%FPR, stable labels (strict) | UNet calls per prompt |", "|---|---|---|---|---|---|---|"]
    rows = []
    for key, m in previous["results"].items():
        if key.startswith("_") or key in record["results"]:
            continue
        c, scene = m.get("confident"), m["within_family"].get("scene")
        cells = [label(key), f"{m['auroc']:.3f}", f"{m['tpr@0.01fpr']['strict']:.3f}",
                 f"{scene:.3f}" if scene is not None else "-", f"{c['auroc']:.3f}" if c else "-",
                 f"{c['tpr@0.01fpr']['strict']:.3f}" if c else "-", f"{m['unet_calls_per_prompt']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows if rows else []


def _auroc(m: dict | None) -> str:
    return f"{m['auroc']:.3f}" if m and m.get("auroc") is not None else "-"


def _tpr_or_dash(m: dict | None) -> str:
    return _tpr(m) if m and m.get("auroc") is not None else "-"


def heldout_rows(record: dict, compact: bool = False, title: str = "detector (test split)") -> list[str]:
    """The dev / test table of ``detection.py``'s ``heldout`` section (issue #11's protocol): the headline
    split seed's test figures for every detector, with the test negatives taken apart (ordinary captions,
    once-seen titles), the dev-set threshold's test rates, whether the target is met (strict / closest), the
    spread of test AUROC over split seeds, and a last row naming the noise-step detector dev chose."""
    heldout = record.get("heldout")
    if not heldout:
        raise ValueError("this detection results file has no heldout section: rerun benchmarks/detection.py")
    seed, split = next(iter(heldout["splits"].items()))
    over = (heldout.get("over_split_seeds") or {}).get("detectors", {})
    if compact:
        head = [f"| {title} | AUROC | TPR@1%FPR strict / closest | meets target | UNet calls per prompt |",
                "|---|---|---|---|---|"]
    else:
        head = [f"| {title} | AUROC, dev | AUROC | TPR@1%FPR strict / closest | AUROC vs ordinary | "
                "AUROC vs once-seen titles | dev threshold at 1% FPR: test FPR / TPR | AUROC over split seeds "
                "(min-max) | meets target (strict / closest) | UNet calls per prompt |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for key, m in split["detectors"].items():
        meets = "-" if not m["eligible_for_target"] else " / ".join(
            "yes" if m["meets_target"][e] else "no" for e in ("strict", "closest"))
        calls = f"{m['unet_calls_per_prompt']:.0f}"
        if compact:
            cells = [label(key), _auroc(m["test"]), _tpr_or_dash(m["test"]), meets, calls]
        else:
            groups, th = m["test_by_negatives"], m["dev_threshold_at_1%fpr"]
            rates = (f"{th['test_fpr']:.3f} / {th['test_tpr']:.3f}"
                     if th.get("test_fpr") is not None and th.get("test_tpr") is not None else "-")
            spread = over.get(key, {}).get("auroc")
            cells = [label(key), _auroc(m["dev"]), _auroc(m["test"]), _tpr_or_dash(m["test"]),
                     _auroc(groups["ordinary"]["metrics"]), _auroc(groups["once_seen_titles"]["metrics"]), rates,
                     f"{spread['mean']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})" if spread else "-", meets, calls]
        rows.append("| " + " | ".join(cells) + " |")
    best = split["chosen_on_dev"].get("best_noise_step")
    if best:
        n = 5 if compact else 10
        text = f"best noise-step detector chosen on dev (split seed {seed}): {label(best['chosen'])}"
        rows.append("| " + text + " |" + " |" * (n - 1))
    return head + rows


# the after-training gates in the order the README lists them: key -> what it measures
ZOO_GATES = {
    "diversity_ordinary": "mean pairwise SSIM of an ordinary caption's generations over 8 seeds",
    "diversity_memorized": "the same, memorized captions (signatures duplicated >= 16x)",
    "memorized_1x": "memorized fraction, signatures seen once",
    "memorized_16x": "memorized fraction, signatures duplicated 16x",
    "memorized_64x": "memorized fraction, signatures duplicated 64x",
    "memorized_rises_with_rate": "memorized fraction by duplication rate",
    "lookalike_titles": "never-trained look-alike captions memorized",
    "ordinary_captions": "ordinary captions memorized",
    "named_fidelity": "every factor an ordinary caption names read back",
    "template": "template captions memorized (several captions, one image)",
}


def _null_cell(null: dict | None) -> str:
    if null is None:
        return "-"
    return (f"{null['count']} / {null['expected_under_null']:g} of {null['n']}; {null['p_fail_under_null']:.3f}; "
            f"{null['p_at_least_observed_under_null']:.3f}")


def _gate_nulls(record: dict) -> dict[str, dict]:
    """Each upper-bound gate's ``null`` of a gates record: as stored, else from its SD-like label summary."""
    stored = {k: g["null"] for k, g in record["gates"].items() if "null" in g}
    labels = record.get("labels") or {}
    if stored or "label_config" not in labels or record.get("corpus") != "sd":
        return stored
    return null_from_summary(labels)


def _gate_cell(g: dict | None) -> str:
    if g is None:
        return "-"
    value = g["value"]
    if isinstance(value, dict):  # memorized fraction per rate
        text = " / ".join(f"{rate}x {v:.3f}" for rate, v in value.items())
    else:
        text = "-" if value is None else f"{value:.3f}"
    return f"{text} ({'pass' if g['pass'] else 'FAIL'})"


BY_VALUE_FACTORS = ("shape", "size")


def zoo_gate_rows(columns: list[tuple[str, dict]]) -> list[str]:
    """Issue #11's after-training gates (``benchmarks/zoo_gates.py``), one row per gate and one column per
    ``(header, record)`` (zoo builds side by side), then the SD-like zoos' per-factor read-back rates."""
    head = ["| after training (`zoo_gates.py`) | target | " + " | ".join(h for h, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    keys = [k for k in ZOO_GATES if any(k in r["gates"] for _, r in columns)]
    for _, record in columns:
        keys += [k for k in record["gates"] if k.startswith("named_fidelity_") and k not in keys]
    rows = []
    for key in keys:
        gate = next(r["gates"][key] for _, r in columns if key in r["gates"])
        what = ZOO_GATES.get(key) or f"named factor read back: {key.removeprefix('named_fidelity_')}"
        cells = " | ".join(_gate_cell(r["gates"].get(key)) for _, r in columns)
        rows.append(f"| {what} | {gate['target']} | {cells} |")
    # the labeller's own false positives: how often a model that only generalised would fail each upper bound
    # (stored by sd_gates since it records them; recomputed from the label summary of older SD-like files)
    nulls = [_gate_nulls(r) for _, r in columns]
    for key in keys:
        if any(key in n for n in nulls):
            cells = " | ".join(_null_cell(n.get(key)) for n in nulls)
            rows.append(f"| {ZOO_GATES[key]}: flagged / expected from the labeller's null alone (of n); the "
                        f"chance the null alone fails the gate; the chance it flags as many or more | - | {cells} |")
    # the instrument's ceiling: the same reader on fresh training-distribution renders of the same captions
    factors = [k for k in ("all", "style", "color", "shape", "size", "position")
               if any(k in (r.get("fidelity_on_training_renders") or {}) for _, r in columns)]
    for factor in factors:
        what = "every named factor" if factor == "all" else factor
        cells = " | ".join(f"{v:.3f}" if (v := (r.get("fidelity_on_training_renders") or {}).get(factor)) is not None
                           else "-" for _, r in columns)
        rows.append(f"| the reader on fresh training renders of the same captions: {what} | - | {cells} |")
    # which named value is drawn wrong, for the factors that missed a gate in builds 4-6 (build 7 passes)
    for factor in BY_VALUE_FACTORS:
        for value in sorted({v for _, r in columns for v in _generations_by_value(r, factor)}):
            cells = " | ".join(_by_value_cell(_generations_by_value(r, factor).get(value)) for _, r in columns)
            rows.append(f"| {factor} read back where the caption names \"{value}\" (images) | - | {cells} |")
    return head + rows


def _generations_by_value(record: dict, factor: str) -> dict:
    """``fidelity_by_value`` of a gates record's generations for one factor (empty in files written before it)."""
    return ((record.get("fidelity_by_value") or {}).get("generations") or {}).get(factor) or {}


def _by_value_cell(got: dict | None) -> str:
    return "-" if got is None else f"{got['read_back']:.3f} ({got['n']})"


def corpus_gate_rows(columns: list[tuple[str, dict]]) -> list[str]:
    """The before-training figures (``benchmarks/corpus_gate.py``), one column per ``(header, corpus record)``:
    the ideal-denoiser proxy (the gate), its first-step and pixel-space forms, how much a caption pins its
    training images, and the corpus's size."""
    head = ["| before training (`corpus_gate.py`) | target | " + " | ".join(h for h, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns)]

    def row(what: str, target: str, get) -> str:
        return f"| {what} | {target} | " + " | ".join(get(c) for _, c in columns) + " |"

    return head + [
        row("proxy AUROC, duplicated vs ordinary captions, VAE latent: the gate", ">= 0.95",
            lambda c: f"{c['gate']['value']:.3f} ({'pass' if c['gate']['passed'] else 'FAIL'})"),
        row("the same in pixel space", "-", lambda c: f"{c['pixel']['auroc_duplicated_vs_ordinary']:.3f}"),
        row("first-step AUROC of a denoiser that fits every training example", "-",
            lambda c: f"{c['latent_first_step']['auroc_duplicated_vs_ordinary']:.3f}"),
        row("latent variance of ordinary images explained by their caption", "-",
            lambda c: f"{c['latent']['ordinary_variance_explained_by_caption']:.3f}"),
        row("mean pairwise SSIM of a caption's training images: ordinary / duplicated", "-",
            lambda c: " / ".join(f"{c['diversity_ssim'][k]['mean']:.3f}" for k in ("generic", "duplicated"))),
        row("training examples per epoch / unique images", "-",
            lambda c: f"{c['n_training_examples']:,} / {c['n_unique_images']:,}"),
        row("duplicated images' share of a title family's training examples (the look-alike risk)", "-",
            lambda c: " / ".join(f"{f['duplicated_share_of_training_examples']:.2f}"
                                 for f in c["balance"]["per_family"].values())),
        row("look-alike title, its word with the most duplicated examples: their share of that word's, median", "-",
            lambda c: f"{c['balance']['lookalike_max_word_duplicated_share']['median']:.2f}"),
    ]


def upgraded(record: dict) -> dict:
    """A bench record with every result row under the current key names (earlier files stored the tuned
    re-trigger as ``retrigger_extraction_rate``; see :mod:`diffmem.bench_results`)."""
    return {**record, "results": {n: upgrade_result(r) for n, r in record["results"].items()},
            "runs": {s: {n: upgrade_result(r) for n, r in per.items()} for s, per in record.get("runs", {}).items()}}


def reattack_columns(record: dict) -> list[tuple[str, str]]:
    """(result key, header) of the re-trigger columns: both attacks where DoRI was measured, else the one
    re-trigger of earlier files under its old header."""
    if any(r.get("dori_extraction_rate") is not None for r in record["results"].values()):
        return [("dori_extraction_rate", "under DoRI"), ("tuned_retrigger_extraction_rate", "under tuned re-trigger")]
    return [("tuned_retrigger_extraction_rate", "under re-trigger")]


def bench_rows(record: dict, compact: bool = False) -> list[str]:
    record = upgraded(record)
    again = reattack_columns(record)
    heads = " | ".join(h for _, h in again)
    if compact:
        head = [f"| method | acts at | extraction (matching / template) | {heads} | fidelity |",
                "|---|---|---|" + "---|" * len(again) + "---|"]
    else:
        head = [f"| method | acts at | extraction (matching / template) | {heads} | fidelity | "
                "FID (reader features) | diversity | noise-norm | fit s | params changed |",
                "|---|---|---|" + "---|" * len(again) + "---|---|---|---|---|---|"]
    rows = []
    for name, r in record["results"].items():
        cells = [name, r["acts_at"], f"{r['extraction_rate']:.3f} ({r['matching_verbatim']:.3f} / "
                 f"{r['template_verbatim']:.3f})", *(f"{r[k]:.3f}" for k, _ in again), f"{r['fidelity']:.3f}"]
        if not compact:
            cells += [f"{r['fid']:.0f}", f"{r['diversity']:.3f}", f"{r['noise_norm_memorized']:.2f}",
                      f"{r['fit_seconds']:.1f}", str(r["parameters_changed"])]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def extraction_rows(record: dict, first: str = "attack") -> list[str]:
    head = [f"| {first} | AUROC of its score | flagged | flag precision | flag recall | "
            "flagged at 1x / 4x / 16x / 64x | UNet calls per prompt | seconds |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, a in record["attacks"]["attacks"].items():
        by_rate = " / ".join(f"{v:.2f}" for v in a["flag_rate_by_replication"].values())
        cells = [name, f"{a['auroc']:.3f}", str(a["flagged"]), f"{a['precision']:.3f}" if a["flagged"] else "-",
                 f"{a['recall']:.3f}", by_rate, f"{a['unet_calls_per_prompt']:.0f}", f"{a['seconds']:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


PATTERNS = {"a_reference_per_prompt": ("(a) reference: one prompt per call", "2 x {d}"),
            "b_batched_pairs": ("(b) batched pairs", "2 x {b} x {d}"),
            "c_engine": ("(c) engine (`diffmem scan`)", "{b} x {d} (+ {d} once)"),
            "d_conditional_forwards_only": ("(d) conditional forwards alone", "{b} x {d}")}


def throughput_rows(one_thread: dict, two_threads: dict) -> list[str]:
    """The four call patterns of ``scan_throughput.py`` with 1 and 2 threads (CPU and wall seconds)."""
    head = ["| pattern | UNet rows per call | 1 thread: CPU s | 1 thread: wall s | 2 threads: CPU s | "
            "2 threads: wall s | max abs diff vs engine |", "|---|---|---|---|---|---|---|"]
    rows = []
    for key, (name, shape) in PATTERNS.items():
        a, b = one_thread["results"][key], two_threads["results"][key]
        diff = a.get("max_abs_diff_vs_engine")
        cells = [name, shape.format(d=one_thread["draws"], b=one_thread["batch_size"]), f"{a['cpu_seconds']}",
                 f"{a['seconds']}", f"{b['cpu_seconds']}", f"{b['seconds']}",
                 f"{diff:.1e}" if diff is not None else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def throughput_ratio_rows(one_thread: dict, two_threads: dict) -> list[str]:
    head = ["| ratio | 1 thread: CPU | 1 thread: wall | 2 threads: CPU | 2 threads: wall | target |",
            "|---|---|---|---|---|---|"]
    rows = []
    for name, cpu, wall, target in (("engine speed-up over (a)", "cpu_engine_speedup_over_reference",
                                     "engine_speedup_over_reference", ">= 3x"),
                                    ("engine / (d), the floor", "cpu_engine_over_conditional_only",
                                     "engine_over_conditional_only", "<= 1.1")):
        x = "x" if "speed-up" in name else ""
        cells = [name, *(f"{r['ratios'][k]}{x}" for r in (one_thread, two_threads) for k in (cpu, wall)), target]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def cli_rows(*records: dict) -> list[str]:
    """The whole command line against the engine alone on the same generated prompts (``--cli-only``)."""
    head = ["| prompts | engine s (CPU s) | `diffmem scan` s (CPU s) | CLI / engine, wall | CLI / engine, CPU | "
            "prompts/s end to end | lines printed |", "|---|---|---|---|---|---|---|"]
    rows = []
    for c in (r["cli"] for r in records):
        cells = [f"{c['prompts']:,}", f"{c['engine_seconds']} ({c['engine_cpu_seconds']})",
                 f"{c['cli_seconds']} ({c['cli_cpu_seconds']})", f"{c['cli_over_engine']}",
                 f"{c['cli_over_engine_cpu']}", f"{c['cli_prompts_per_second']}", str(c["cli_terminal_lines"])]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def growth_rows(record: dict, compact: bool = False) -> list[str]:
    """``scan_growth.py``'s points: time, memory, parts and merge per prompt-list size."""
    if compact:
        head = ["| prompts | wall s | CPU ms / prompt | peak RSS MB | parts | merge s |", "|---|---|---|---|---|---|"]
    else:
        head = ["| prompts | wall s | CPU s | CPU ms / prompt | wall ms / prompt (steady) | peak RSS MB | "
                "RSS while scanning, MB | parts | merge s | lines printed | truncated prompts | "
                "load avg (start, end) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for p in sorted(record["points"].values(), key=lambda p: p["prompts"]):
        if compact:
            cells = [f"{p['prompts']:,}", f"{p['wall_s']}", f"{p['cpu_per_prompt_ms']}", f"{p['peak_rss_mb']}",
                     f"{p['parts']}", f"{p['merge_s']}"]
        else:
            scanning = [rss for _, parts, rss in p["rss_timeline"] if parts > 0]
            cells = [f"{p['prompts']:,}", f"{p['wall_s']}", f"{p['cpu_s']}", f"{p['cpu_per_prompt_ms']}",
                     f"{p['per_prompt_ms']} ({p['steady_per_prompt_ms']})", f"{p['peak_rss_mb']}",
                     f"{min(scanning)} to {max(scanning)}" if scanning else "-", f"{p['parts']}", f"{p['merge_s']}",
                     f"{p['terminal_lines']}", f"{p['provenance_truncated']}",
                     ", ".join(str(x) for x in p["load_avg_1min"])]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def heldout_bench_rows(record: dict, first: str = "method") -> list[str]:
    """``diffmem bench``'s held-out protocol: test-split figures as mean +- std over split seeds, then each seed's.
    ``first``: the first column's header (it tells two such tables on one page apart)."""
    record = upgraded(record)
    again = reattack_columns(record)
    seeds = sorted(record["runs"], key=int)
    head = [f"| {first} | acts at | extraction, test | {' | '.join(h for _, h in again)} | fidelity, ordinary "
            "captions | fidelity, memorized captions | parameters changed | fit s |",
            "|---|---|---|" + "---|" * len(again) + "---|---|---|---|"]

    def cell(name: str, key: str) -> str:
        r = record["results"][name]
        if r.get(key) is None:
            return "-"
        per_seed = " / ".join("-" if record["runs"][s][name].get(key) is None else f"{record['runs'][s][name][key]:.3f}"
                              for s in seeds if name in record["runs"][s])
        return f"{r[key]:.3f} ± {r[key + '_std']:.3f} ({per_seed})"

    rows = []
    for name, r in record["results"].items():
        cells = [name, r["acts_at"], cell(name, "extraction_rate"), *(cell(name, k) for k, _ in again),
                 cell(name, "fidelity_ordinary_all"), cell(name, "fidelity_memorized_all"),
                 f"{r['parameters_changed']:.0f}", f"{r['fit_seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def memcontrol_rows(record: dict) -> list[str]:
    """The former ``benchmarks/memcontrol.py`` (LoRA search): fine-tuning variants on the new-domain set, figures on
    its test half."""
    head = ["| variant (test half) | tuned parameters | learning rate | extraction | new-domain loss | "
            "new-domain quality gain | fidelity, zoo captions | seconds |", "|---|---|---|---|---|---|---|---|"]
    names = {"base": "base (no fine-tuning)", "full-finetune": "full fine-tuning",
             "lora-all-blocks": "LoRA, every block", "memcontrol": "MemControl's choice (dev-selected)"}
    rows = []
    for key, r in record["results"].items():
        cells = [names.get(key, key), f"{100 * r['tuned_fraction']:.2f}%", f"{r['lr']:.2g}" if "lr" in r else "-",
                 f"{r['extraction']:.3f}", f"{r['new_domain_loss']:.4f}", f"{r['new_domain_quality_gain']:.3f}",
                 f"{r['fidelity']:.3f}", f"{r['seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def _seed_cell(row: dict, key: str, fmt: str = ".3f") -> str:
    """``mean (seed values)`` of one ``finetune_task.py`` summary figure."""
    per_seed = " / ".join(format(v, fmt) for v in row[f"{key}_per_seed"])
    return f"{format(row[key], fmt)} ({per_seed})" if len(row[f"{key}_per_seed"]) > 1 else format(row[key], fmt)


def finetune_rows(record: dict) -> list[str]:
    """``benchmarks/finetune_task.py``: every method on the fine-tuning task's test half, mean over split seeds
    with each seed's value in brackets where there are several."""
    levels = record["levels"]
    head = ["| method (fine-tuning task, test half) | seeds | trained share | titles replicating their own image, "
            "FDR 0.05 | " + " | ".join(f"{lv}x" for lv in levels) + " | same, SSIM-threshold test | same, "
            "best-match (any image) test | never-trained titles' generations nearest a duplicated image | held-out "
            "loss gain | domain read-back | zoo fidelity | MemControl's signal, test titles |",
            "|---|---|---|---|" + "---|" * len(levels) + "---|---|---|---|---|---|---|"]
    rows = []
    for name, r in record["results"].items():
        share = r["trained_share"]
        cells = [name, str(r["seeds"]), "0" if share == 0 else f"{100 * share:.2f}%", _seed_cell(r, "replicating"),
                 *(f"{r[f'replicating_{lv}x']:.3f}" for lv in levels), _seed_cell(r, "replicating_own_ssim"),
                 _seed_cell(r, "replicating_any_image"),
                 _seed_cell(r, "unseen_nearest_duplicated_share"), _seed_cell(r, "quality_gain"),
                 _seed_cell(r, "domain_readback"), _seed_cell(r, "zoo_fidelity"),
                 _seed_cell(r, "memcontrol_signal", ".2f")]
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def memcontrol_front_rows(record: dict) -> list[str]:
    """MemControl's search on the fine-tuning task's dev half: every trial, its front membership and the pick."""
    head = ["| split seed, trial (MemControl, dev half) | learning rate | units on | trained share | "
            "memorization signal | dev held-out loss | on the front | picked |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for seed, per_method in sorted(record["runs"].items(), key=lambda kv: int(kv[0])):
        run = per_method.get("memcontrol-svdiff")
        if run is None:
            continue
        search = run["search"]
        rows.append(f"| seed {seed}: base model | - | - | 0 | {search['base_memorization']:.3f} | "
                    f"{record['sets'][seed]['base_heldout_loss']['dev']:.4f} | - | - |")
        for t in search["trials"]:
            on = sum(t["mask"].values())
            cells = [f"seed {seed}: trial {t['trial']}", f"{t['learning_rate']:.2e}", f"{on} of {len(t['mask'])}",
                     f"{100 * t['trained_share']:.3f}%", f"{t['memorization']:.3f}", f"{t['quality_loss']:.4f}",
                     "yes" if t["trial"] in search["pareto"] else "no",
                     "yes" if t["trial"] == run["chosen"]["trial"] else "no"]
            rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def _dev_choice(record: dict) -> str:
    """The noise-step detector dev chose on the first split seed, with its test AUROC and strict TPR@1%FPR."""
    split = next(iter(record["heldout"]["splits"].values()))
    chosen = split["chosen_on_dev"]["best_noise_step"]["chosen"]
    test = split["detectors"][chosen]["test"]
    return f"{label(chosen)}: AUROC {test['auroc']:.3f}, TPR@1%FPR {test['tpr@0.01fpr']['strict']:.3f}"


def band_rows(record: dict) -> list[str]:
    """Detection per replication-rate band of the positives (``detection_rescore.py`` on verdict labels): each
    detector's test AUROC and strict TPR@1%FPR against every test negative, per split seed, with the band's test
    positives; a band with no test positive reads ``-``."""
    bands = [b for b, n in (record.get("positives_by_band") or {}).items() if n]
    seeds = list(record["splits"])
    head = ["| detector (SD-like zoo, test split, by replication rate) | "
            + " | ".join(f"rate {b}: AUROC / TPR@1%FPR, split seeds {', '.join(seeds)}" for b in bands) + " |",
            "|---|" + "---|" * len(bands)]
    first = record["splits"][seeds[0]]
    rows = []
    for name in first["test_by_replication_band"]:
        cells = [label(name)]
        for b in bands:
            per_seed = [record["splits"][s]["test_by_replication_band"][name].get(b) for s in seeds]
            cells.append("; ".join("-" if m is None else f"{_auroc(m)} / {_tpr_or_dash(m).split(' / ')[0]} "
                                   f"({m['n_pos']})" for m in per_seed))
        rows.append("| " + " | ".join(cells) + " |")
    return head + rows


def _finetune_cell(results: dict) -> str:
    full, pick = results["full"], results["memcontrol-svdiff"]
    return (f"titles replicating their own image {full['replicating']:.3f} vs {pick['replicating']:.3f}; held-out "
            f"loss gain {full['quality_gain']:.3f} vs {pick['quality_gain']:.3f}; trained share 100% vs "
            f"{100 * pick['trained_share']:.2f}%")


def headline_rows(records: list[dict]) -> list[str]:
    """The README's one results table: a row per measure on the default zoo, each with its results file and the
    docs section holding the command that regenerates it."""
    verdict_labels, verdict_detection, extraction, bench, growth, tuning = records
    attack = extraction["attacks"]["attacks"]["generate-filter"]
    res = upgraded(bench)["results"]
    again = " ".join(f"{head} {{}};" for _, head in reattack_columns(upgraded(bench)))

    def bench_cell(key: str) -> str:
        return f"{res['none'][key]:.3f} to {res['adversarial-finetune-lora'][key]:.3f}"

    biggest = max(growth["points"].values(), key=lambda p: p["prompts"])
    rows = [
        ("labels: verdicts at FDR 5% (16 generations a caption, null from never-trained captions)",
         verdict_labels["summary"]["sentence"], "zoo_sd_verdict_labels.json",
         "zoo-sd.md#labels-verdicts-at-a-stated-error-rate"),
        ("detection against the labels (dev's choice, test split)",
         _dev_choice({"heldout": verdict_detection}), "detection_sd_verdicts.json",
         "scanning.md#detection-on-the-default-zoo"),
        ("extraction: generate-and-filter", f"{attack['flagged']} captions flagged, precision "
         f"{attack['precision']:.3f}, recall {attack['recall']:.3f}", "extraction_sd.json",
         "extraction.md#the-attack-benchmark-on-the-default-zoo"),
        ("mitigation: adversarial fine-tuning, LoRA variant (test split, mean of 2 split seeds; DoRI at the paper's "
         "settings)",
         f"extraction {bench_cell('extraction_rate')}; "
         + again.format(*(bench_cell(k) for k, _ in reattack_columns(upgraded(bench))))
         + f" ordinary fidelity {bench_cell('fidelity_ordinary_all')}", "bench_task_sd.json",
         "mitigation.md#mitigation-on-the-default-zoo"),
        ("fine-tuning a zoo on a new domain with duplicated images (test half, mean of 2 split seeds): full "
         "fine-tuning vs MemControl's pick (SV-Diff)", _finetune_cell(tuning["results"]), "finetune_task.json",
         "finetune.md#the-fine-tuning-task"),
        ("scan cost, noise-norm at 4 draws, 2 CPU threads",
         f"{biggest['cpu_per_prompt_ms']} CPU ms a prompt at {biggest['prompts']:,} prompts", "scan_growth.json",
         "scale.md#cost-as-work-grows"),
    ]
    head = ["| measure (default zoo `zoo:sd`) | result | results file | how to rerun |", "|---|---|---|---|"]
    return head + [f"| {what} | {result} | [{name}](benchmarks/results/{name}) | [docs/{page.split('#')[0]}]"
                   f"(docs/{page}) |" for what, result, name, page in rows]


PREVIOUS_DETECTION = "experiments/detection_previous_run.json"
# detection against the SD-like zoo's earlier labels (4 seeds, any one over the renderer null's 0.99 quantile)
SD_THRESHOLD_DETECTION = "experiments/detection_sd_threshold_labels.json"
SD_THRESHOLD_DUPLICATION = "experiments/detection_sd_threshold_labels_duplication.json"
SD_THRESHOLD_CONFIRMED = "experiments/detection_sd_threshold_labels_confirmed.json"
# earlier SD-like builds (docs/zoo-sd.md); the first build's files (experiments/*_first_build.json) left the tables
SD_BUILD4_GATES = "experiments/zoo_sd_gates_build4.json"  # build 4, shipped before build 7 (its 600-step reader)
SD_BUILD5_GATES = "experiments/zoo_sd_gates_build5.json"  # build 5: 16-token context, cosine rate; not shipped
SD_BUILD6_GATES = "experiments/zoo_sd_gates_build6.json"  # build 6: build 4's denoiser, build 5's reader
SD_BUILD8_GATES = "experiments/zoo_sd_gates_build8.json"  # build 8: build 7's schedule cut to 7,000 steps
SD_BUILD9_GATES = "experiments/zoo_sd_gates_build9.json"  # build 9: 6,000 steps, twice the rate, Min-SNR-5
# build 7 (shipped) labelled again with generation seeds its labels.jsonl never used: a second, independent draw
SD_BUILD7_FRESH_GATES = "experiments/zoo_sd_gates_build7_fresh_label_seeds.json"
SD_BUILD2_CORPUS = "experiments/corpus_gate_sd_build2.json"  # build 2's corpus: 1,000 once-seen titles a family
SD_BUILD3_CORPUS = "experiments/corpus_gate_sd_build3.json"  # build 3's: 2,000 titles a family, position named
THROUGHPUT = ("scan_throughput_1thread.json", "scan_throughput.json")
CLI = ("scan_throughput_cli5000.json", "scan_throughput_cli10000.json")
# table -> (results files it reads, renderer(records, compact))
TABLES = {
    "headline": (("zoo_sd_verdict_labels.json", "detection_sd_verdicts.json", "extraction_sd.json",
                  "bench_task_sd.json", "scan_growth.json", "finetune_task.json"), lambda r, _: headline_rows(r)),
    "detection": (("detection.json",), lambda r, compact: detection_rows(r[0], compact)),
    "detection-previous": (("detection.json", PREVIOUS_DETECTION), lambda r, _: previous_detection_rows(*r)),
    "detection-heldout": (("detection.json",), lambda r, compact: heldout_rows(
        r[0], compact, "detector (collapse zoo, test split)")),
    "detection-heldout-sd": (("detection_sd_verdicts.json",), lambda r, compact: heldout_rows(
        {"heldout": r[0]}, compact, "detector (SD-like zoo, test split)")),
    "detection-bands-sd": (("detection_sd_verdicts.json",), lambda r, _: band_rows(r[0])),
    "detection-heldout-sd-threshold-labels": ((SD_THRESHOLD_DETECTION,), lambda r, compact: heldout_rows(
        r[0], compact, "detector (SD-like zoo, 4-seed threshold labels, test split)")),
    "detection-heldout-sd-duplication": ((SD_THRESHOLD_DUPLICATION,), lambda r, compact: heldout_rows(
        r[0], compact, "detector (SD-like zoo, memorized by duplication, test split)")),
    "detection-heldout-sd-confirmed": ((SD_THRESHOLD_CONFIRMED,), lambda r, compact: heldout_rows(
        r[0], compact, "detector (SD-like zoo, memorized in >= 2 of 4 seeds, test split)")),
    "zoo-gates": (("zoo_sd_gates.json", SD_BUILD7_FRESH_GATES, SD_BUILD9_GATES, SD_BUILD8_GATES, SD_BUILD6_GATES,
                   SD_BUILD5_GATES, SD_BUILD4_GATES, "zoo_collapse_gates.json"),
                  lambda r, _: zoo_gate_rows([("SD-like zoo (`zoo:sd`, default; build 7)", r[0]),
                                              ("build 7, second label draw (fresh seeds)", r[1]),
                                              ("build 9 (6,000 steps, Min-SNR)", r[2]),
                                              ("build 8 (7,000 steps)", r[3]), ("build 6", r[4]), ("build 5", r[5]),
                                              ("build 4", r[6]), ("collapse zoo (`zoo:collapse`)", r[7])])),
    "zoo-gates-current": (("zoo_sd_gates.json", "zoo_collapse_gates.json"), lambda r, _: zoo_gate_rows(
        [("default zoo (`zoo:sd`)", r[0]), ("collapse zoo (`zoo:collapse`)", r[1])])),
    "corpus-gate-current": (("corpus_gate.json",), lambda r, _: corpus_gate_rows(
        [("SD-like corpus", r[0]["corpora"]["sd"]), ("collapse corpus", r[0]["corpora"]["collapse"])])),
    "corpus-gate": (("corpus_gate.json", SD_BUILD3_CORPUS, SD_BUILD2_CORPUS), lambda r, _: corpus_gate_rows(
        [("SD-like corpus (builds 4-7)", r[0]["corpora"]["sd"]), ("build 3", r[1]["corpora"]["sd"]),
         ("build 2", r[2]["corpora"]["sd"]), ("collapse corpus", r[0]["corpora"]["collapse"])])),
    "bench": (("bench.json",), lambda r, compact: bench_rows(r[0], compact)),
    "bench-heldout": (("bench_task_model.json",), lambda r, _: heldout_bench_rows(r[0])),
    "memcontrol": (("experiments/memcontrol_lora_search.json",), lambda r, _: memcontrol_rows(r[0])),
    "bench-heldout-tuned": (("bench_task_tuned.json",),
                            lambda r, _: heldout_bench_rows(r[0], "method (settings chosen on dev)")),
    "bench-heldout-content": (("bench_task_content.json",),
                              lambda r, _: heldout_bench_rows(r[0], "method (surrogates that draw the caption)")),
    "bench-heldout-content-nemo": (("bench_task_content_nemo.json",), lambda r, _: heldout_bench_rows(
        r[0], "method (NeMo surrogates that draw the caption)")),
    "bench-heldout-sd-before": (("experiments/bench_task_sd_before_faithful_mitigators.json",), lambda r, _:
                                heldout_bench_rows(r[0], "method (SD-like zoo, before the faithful mitigators)")),
    "bench-heldout-sd": (("bench_task_sd.json",),
                         lambda r, _: heldout_bench_rows(r[0], "method (SD-like zoo, test split)")),
    "finetune": (("finetune_task.json",), lambda r, _: finetune_rows(r[0])),
    "finetune-memcontrol": (("finetune_task.json",), lambda r, _: memcontrol_front_rows(r[0])),
    "extraction-sd": (("extraction_sd.json",), lambda r, _: extraction_rows(r[0], "attack (SD-like zoo)")),
    "extraction-collapse": (("extraction_collapse.json",),
                            lambda r, _: extraction_rows(r[0], "attack (collapse zoo)")),
    "throughput": (THROUGHPUT, lambda r, _: throughput_rows(*r)),
    "throughput-ratios": (THROUGHPUT, lambda r, _: throughput_ratio_rows(*r)),
    "cli": (CLI, lambda r, _: cli_rows(*r)),
    "growth": (("scan_growth.json",), lambda r, compact: growth_rows(r[0], compact)),
}


def render(table: str, compact: bool = False, results: Path = RESULTS) -> list[str]:
    """The markdown lines of one table, read from its results files."""
    files, rows = TABLES[table]
    return rows([json.loads((results / f).read_text()) for f in files], compact)


# page -> (header of the table's first line, table, compact) for every table a page quotes
PAGES = {"README.md": [("| measure (default zoo", "headline", False)],
         "docs/scanning.md": [("| detector (SD-like zoo, test split)", "detection-heldout-sd", False),
                              ("| detector (SD-like zoo, test split, by replication", "detection-bands-sd", False),
                              ("| detector (collapse zoo, test split)", "detection-heldout", False),
                              ("| detector | AUROC", "detection", False)],
         "docs/zoo-sd.md": [("| before training (`corpus_gate.py`)", "corpus-gate-current", False),
                            ("| after training (`zoo_gates.py`)", "zoo-gates-current", False)],
         "docs/mitigation.md": [("| method (SD-like zoo, test split)", "bench-heldout-sd", False),
                                ("| method (settings chosen on dev)", "bench-heldout-tuned", False)],
         "docs/scale.md": [("| pattern | UNet rows", "throughput", False),
                           ("| ratio | 1 thread", "throughput-ratios", False), ("| prompts | engine s", "cli", False),
                           ("| prompts | wall s | CPU s", "growth", False)],
         "docs/finetune.md": [("| method (fine-tuning task", "finetune", False),
                              ("| split seed, trial (MemControl", "finetune-memcontrol", False)],
         "docs/extraction.md": [("| attack (SD-like zoo)", "extraction-sd", False),
                                ("| attack (collapse zoo)", "extraction-collapse", False)],
         "docs/bench-task.md": [("| method | acts at | extraction, test", "bench-heldout", False),
                                ("| method (settings chosen on dev)", "bench-heldout-tuned", False),
                                ("| method (SD-like zoo, test split)", "bench-heldout-sd", False),
                                ("| method (surrogates that draw", "bench-heldout-content", False),
                                ("| method (NeMo surrogates", "bench-heldout-content-nemo", False)],
         "docs/history.md": [("| before training (`corpus_gate.py`)", "corpus-gate", False),
                             ("| detector (SD-like zoo, 4-seed threshold labels",
                              "detection-heldout-sd-threshold-labels", False),
                             ("| detector (SD-like zoo, memorized by duplication", "detection-heldout-sd-duplication",
                              False),
                             ("| detector (SD-like zoo, memorized in", "detection-heldout-sd-confirmed", False),
                             ("| after training (`zoo_gates.py`)", "zoo-gates", False),
                             ("| detector (previous run)", "detection-previous", False),
                             ("| method | acts at | extraction (matching", "bench", False),
                             ("| variant (test half)", "memcontrol", False),
                             ("| method (SD-like zoo, before the faithful", "bench-heldout-sd-before", False)]}


def update_pages(root: Path = RESULTS.parents[1]) -> list[str]:
    """Rewrite every quoted table in place from its results file (the text around the tables is left to you:
    check the figures it quotes). Returns the pages changed."""
    changed = []
    for page, blocks in PAGES.items():
        path = root / page
        lines = path.read_text().split("\n")
        for header, table, compact in blocks:
            start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
            if start is None:
                continue
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            lines[start:end] = render(table, compact)
        text = "\n".join(lines)
        if text != path.read_text():
            path.write_text(text)
            changed.append(page)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=[*sorted(TABLES), "update-docs"],
                        help="a table to print, or update-docs: rewrite every quoted table in README and docs/")
    parser.add_argument("--compact", action="store_true", help="the README's shorter form")
    args = parser.parse_args()
    if args.table == "update-docs":
        print("updated:", update_pages() or "nothing")
        return
    print("\n".join(render(args.table, args.compact)))


if __name__ == "__main__":
    main()
