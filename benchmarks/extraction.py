"""Benchmark: extraction attacks against a zoo's ground truth, the re-trigger attack against a
suppressing baseline, and the quality metrics' sanity checks, on either zoo (``--model``).

1. One-step white-box, one-step black-box and generate-and-filter on a stratified subset of the zoo's
   captions: AUROC of each score, precision / recall of each flag against the labels (one-step flags:
   threshold at 1% FPR on separate calibration captions: ordinary captions and, on the SD-like zoo,
   once-seen titles, none of them in the subset), extraction rate per replication rate, UNet calls per
   prompt. A generation counts as extracted when its best training match passes the threshold of its
   caption's family (the thresholds the zoo's labels use), so precision and recall compare like with like.
   Every prompt's scores and flags are written beside the JSON (``<out stem>_scores.parquet``), so
   ``diffmem eval detect`` regenerates the AUROCs.
2. Re-trigger (DoRI): memorized captions under Gaussian embedding noise (Somepalli's baseline,
   strong enough to suppress replication) before and after the attack.
3. FID with the zoo task's reader features: the zoo's own samples vs a deliberately degraded copy (noise on
   the UNet weights); the task's prompt fidelity on generic captions with fresh seeds vs the zoo's label
   figure.

    .venv/bin/python benchmarks/extraction.py                       # zoo:sd -> results/extraction_sd.json
    .venv/bin/python benchmarks/extraction.py --model zoo:collapse  # -> results/extraction_collapse.json
    .venv/bin/python benchmarks/extraction.py --only attacks        # part 1 only, into the existing record
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

from diffmem.attacks import AttackContext, make_attack
from diffmem.eval.detection import threshold_at_fpr
from diffmem.eval.quality import fid
from diffmem.io import atomic_write_text
from diffmem.mitigators import make_mitigator
from diffmem.models import load_model
from diffmem.provenance import portable_json
from diffmem.tasks.zoo import ZooTask, zoo_task_for, zoo_training_index
from diffmem.zoo.load import load_labels, zoo_corpus_name, zoo_folder_for

# captions per kind in the evaluation subset (a kind a zoo lacks contributes none; the collapse zoo has no
# titles, the SD-like zoo no scenes), and the kinds whose remaining captions calibrate the one-step thresholds
SUBSET = {"signature": 100, "template": 30, "heldout_signature": 60, "heldout_template": 12, "generic": 80,
          "heldout_generic": 40, "generic_scene": 80, "title": 100}
CALIBRATION_KINDS = ("generic", "title")
CALIBRATION_PER_KIND = 200
PARTS = ("attacks", "retrigger", "quality")


def stratified(labels: list[dict], rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """The evaluation subset, and disjoint captions labelled not memorized (up to 200 of each calibration
    kind the subset left over) for calibrating one-step thresholds."""
    chosen, calib = [], []
    for kind, n in SUBSET.items():
        rows = [r for r in labels if r["kind"] == kind]
        order = rng.permutation(len(rows))
        chosen += [rows[i] for i in order[:n]]
        if kind in CALIBRATION_KINDS:
            calib += [rows[i] for i in order[n:] if not rows[i]["memorized"]][:CALIBRATION_PER_KIND]
    return chosen, calib


def run_attack(model, attack, rows, index, batch: int = 64) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        own = [r["item_id"] if not r["kind"].startswith("heldout") else None for r in chunk]
        res = attack.run(model, [r["caption"] for r in chunk], AttackContext(index=index, own_items=own))
        for k, v in res.items():
            out.setdefault(k, []).extend(np.asarray(v).tolist())
    return out


def family_thresholds(folder: Path) -> dict[str, float]:
    """The zoo's extraction threshold of each caption family (collapse: ``object``, ``scene``; SD-like:
    ``ordinary`` and one per style), as its labels use them."""
    record = json.loads((folder / "zoo.json").read_text())
    return {family: float(t["threshold"]) for family, t in record["labels"]["thresholds"].items()}


def extracted_by_family(similarity, match_label, rows: list[dict], thresholds: dict[str, float]) -> np.ndarray:
    """The attack's matched label per prompt, kept only where the best match passes its family's threshold.

    The attack matches with the index's single threshold (the lowest bar the labels use for any family: the
    collapse zoo's scene threshold, the SD-like zoo's highest family threshold); a caption's label needs its
    own family's threshold (on the collapse zoo a single object needs 0.993), so a match between the two
    thresholds is not an extraction for it. NaN similarity (nothing matched) is never extracted.
    """
    sim = np.asarray(similarity, dtype=float)
    passes = np.nan_to_num(sim, nan=-np.inf) > np.array([thresholds[r["family"]] for r in rows])
    return np.where(passes, np.asarray(match_label), "none")


def attack_table(model, rows, calib, index, folder: Path, scores_path: Path | None = None) -> dict:
    y = np.array([r["memorized"] for r in rows])
    rates = sorted({r["replication"] for r in rows if r["kind"] == "signature"})
    thresholds = family_thresholds(folder)
    results = {}
    columns: dict[str, pa.Array] = {}
    for name, options in [("one-step-whitebox", {}), ("one-step-blackbox", {"edge_threshold": 0.5}),
                          ("generate-filter", {"generations": 8, "min_clique": 3, "steps": 20})]:
        attack = make_attack(name, **options)
        start = time.perf_counter()
        res = run_attack(model, attack, rows, index)
        seconds = time.perf_counter() - start
        score = np.array(res["score"], dtype=float)
        if name.startswith("one-step"):
            calib_scores = np.array(run_attack(model, attack, calib, index)["score"], dtype=float)
            thr = threshold_at_fpr(calib_scores, 0.01)
            flagged = score > thr
        else:
            thr, flagged = None, np.array(res["flagged"], dtype=bool)
        tp = int((flagged & y).sum())
        entry = {"options": attack.config(), "auroc": float(roc_auc_score(y, score)), "threshold": thr,
                 "precision": tp / max(int(flagged.sum()), 1), "recall": tp / max(int(y.sum()), 1),
                 "flagged": int(flagged.sum()), "unet_calls_per_prompt": attack.unet_calls_per_prompt(),
                 "seconds": round(seconds, 1),
                 "flag_rate_by_replication": {str(rate): float(np.mean([f for f, r in zip(flagged, rows)
                                                                        if r["kind"] == "signature"
                                                                        and r["replication"] == rate]))
                                              for rate in rates},
                 "flag_rate_by_kind": {k: float(np.mean([f for f, r in zip(flagged, rows) if r["kind"] == k]))
                                       for k in SUBSET if any(r["kind"] == k for r in rows)}}
        columns[name] = pa.array(score, pa.float64())
        columns[f"flagged_{name}"] = pa.array(flagged.tolist())
        if "match_label" in res:
            labels = extracted_by_family(res["match_similarity"], res["match_label"], rows, thresholds)
            extracted = labels != "none"
            entry["extracted"] = {"matching_verbatim": int((labels == "matching_verbatim").sum()),
                                  "template_verbatim": int((labels == "template_verbatim").sum()),
                                  "unattributed": int((labels == "unattributed").sum()),
                                  "precision": int((extracted & y).sum()) / max(int(extracted.sum()), 1),
                                  "recall": int((extracted & y).sum()) / max(int(y.sum()), 1),
                                  "thresholds_by_family": thresholds,
                                  "matched_at_index_threshold": int((np.array(res["match_label"]) != "none").sum())}
            entry["extraction_rate_by_replication"] = {
                str(rate): float(np.mean([e for e, r in zip(extracted, rows) if r["kind"] == "signature"
                                          and r["replication"] == rate])) for rate in rates}
            columns[f"{name} match similarity"] = pa.array(np.asarray(res["match_similarity"], float), pa.float64())
            columns[f"flagged_{name}_extracted"] = pa.array(extracted.tolist())
        results[name] = entry
    if scores_path is not None:
        table = pa.table({"id": [str(r["item_id"]) for r in rows], "text": [r["caption"] for r in rows], **columns})
        pq.write_table(table, scores_path, compression="zstd", compression_level=19)
    return {"n_prompts": len(rows), "n_memorized": int(y.sum()), "n_calibration": len(calib),
            "calibration_kinds": sorted({r["kind"] for r in calib}), "attacks": results,
            "scores_file": scores_path.name if scores_path is not None else None}


def retrigger_check(model, labels, index, n: int, scale: float, lr: float, bound: float) -> dict:
    rows = [r for r in labels if r["kind"] == "signature" and r["memorized"]][:n]
    own = [r["item_id"] for r in rows]
    captions = [r["caption"] for r in rows]
    noisy = make_mitigator("embedding-noise", scale=scale).apply(model)
    k = 4

    def plain_rate(m) -> float:
        images = m.sample([c for c in captions for _ in range(k)], [j for _ in captions for j in range(k)],
                          num_inference_steps=25).images
        return float((index.matcher.match(images).similarity > index.threshold).float().mean())

    attack = make_attack("retrigger", generations=k, lr=lr, max_relative_norm=bound)
    res = attack.run(noisy, captions, AttackContext(index=index, own_items=own))
    return {"prompts": len(rows), "embedding_noise_scale": scale, "replication_unmitigated": plain_rate(model),
            "replication_under_embedding_noise": plain_rate(noisy),
            "replication_after_retrigger_on_noisy_model": float(np.mean(res["replication_rate"])),
            "mean_relative_embedding_shift": float(np.mean(res["embedding_shift"])), "attack": attack.config()}


def degraded_copy(model, sigma: float):
    """``model`` with Gaussian noise of ``sigma`` x each UNet weight tensor's std added (fixed seed)."""
    degraded = copy.copy(model)
    degraded.unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for p in degraded.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * sigma * p.std().nan_to_num(0))
    return degraded


def fid_terms(real: torch.Tensor, fake: torch.Tensor, features) -> dict[str, float]:
    """The parts FID adds up (Heusel et al. 2017: ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2)): the mean
    term and each set's feature spread tr(S), so a change of FID can be read as a shift or as a spread."""
    with torch.no_grad():
        r, g = features(real).double(), features(fake).double()
    return {"mean_term": float((r.mean(0) - g.mean(0)).pow(2).sum()),
            "trace_reference": float(torch.cov(r.T).trace()), "trace_generated": float(torch.cov(g.T).trace())}


def retrigger_sweep(model, labels, index, n: int, scales: list[float], lr: float, bound: float) -> dict:
    """:func:`retrigger_check` at the first scale; with more, each scale's under ``by_noise_scale`` (the attack
    only means something where the baseline suppresses replication first)."""
    runs = [retrigger_check(model, labels, index, n, scale, lr, bound) for scale in scales]
    return runs[0] | ({"by_noise_scale": runs} if len(runs) > 1 else {})


def quality_checks(model, task: ZooTask, labels, index, n_generic: int, sigmas: list[float]) -> dict:
    """FID and fidelity of the model's generic generations, then of degraded copies: the first of ``sigmas``
    under the record's original keys, every one under ``degraded`` (a sanity check must see the damage)."""
    pool = [r["caption"] for r in labels if r["kind"] == "generic"][::3]
    generic = [pool[i % len(pool)] for i in range(n_generic)]  # fewer than n_generic (SD-like: 49) recur, new seeds
    seeds = [1000 + i for i in range(len(generic))]
    own = model.sample(generic, seeds, num_inference_steps=25).images
    generic_items = {r["item_id"] for r in labels if r["kind"] == "generic"}
    generic_images = [i for i, it in enumerate(index.item_of_image.tolist()) if it in generic_items]
    stride = max(1, len(generic_images) // (2 * n_generic))  # spread over every item (SD-like: many images each)
    real_idx = generic_images[::stride][: 2 * n_generic]
    real = index.images[real_idx]
    record = json.loads((task.folder() / "zoo.json").read_text())
    features = task.fid_features()
    degraded = []
    for sigma in sigmas:
        bad = degraded_copy(model, sigma).sample(generic, seeds, num_inference_steps=25).images
        degraded.append({"sigma_times_weight_std": sigma, "fid_vs_training_renders": fid(real, bad, features),
                         "fid_terms": fid_terms(real, bad, features), "fidelity": task.fidelity(bad, generic)["all"]})
    return {"n_generic": len(generic), "fid_zoo_vs_training_renders": fid(real, own, features),
            "fid_terms_zoo": fid_terms(real, own, features),
            "fid_degraded_vs_training_renders": degraded[0]["fid_vs_training_renders"],
            "degradation_sigma_times_weight_std": sigmas[0], "fidelity": task.fidelity_description(),
            "fidelity_fresh_seeds": task.fidelity(own, generic)["all"],
            "fidelity_degraded": degraded[0]["fidelity"], "degraded": degraded,
            "fidelity_zoo_labels": record["labels"]["generic_fidelity"]["generic"]}


def is_extraction_record(path: Path) -> bool:
    """Whether ``path`` holds a record this script wrote (the only kind of file it may overwrite)."""
    try:
        return json.loads(path.read_text()).get("benchmark") == "extraction"
    except (ValueError, AttributeError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:sd", help="a zoo: zoo:sd (default), zoo:collapse or a zoo folder")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/extraction_<corpus>.json")
    parser.add_argument("--retrigger-prompts", type=int, default=16)
    parser.add_argument("--noise-scale", type=float, nargs="+", default=[1.0],
                        help="embedding-noise scales of the suppressing baseline; the first under 'retrigger', "
                             "every one under 'retrigger.by_noise_scale' (default: 1.0)")
    parser.add_argument("--degrade-sigma", type=float, nargs="+", default=[0.05],
                        help="UNet weight noise (x each tensor's std) of the quality check's degraded copies "
                             "(default: 0.05)")
    parser.add_argument("--generic", type=int, default=300)
    parser.add_argument("--retrigger-lr", type=float, default=0.01,
                        help="DoRI's 0.1 overshoots on the zoo's embedding scale (README)")
    parser.add_argument("--retrigger-bound", type=float, default=0.3)
    parser.add_argument("--only", choices=list(PARTS), action="append", default=None,
                        help="rerun this part into the existing --out record (repeatable); default: every part")
    parser.add_argument("--only-attacks", dest="only", action="append_const", const="attacks",
                        help="same as --only attacks")
    parser.add_argument("--only-retrigger", dest="only", action="append_const", const="retrigger",
                        help="same as --only retrigger")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = zoo_folder_for(args.model)
    if folder is None:
        raise SystemExit(f"--model '{args.model}' is not a zoo (zoo:sd, zoo:collapse or a zoo folder); this "
                         "benchmark needs the zoo's labels")
    out = Path(args.out or f"benchmarks/results/extraction_{zoo_corpus_name(folder)}.json")
    if args.only and not out.is_file():
        raise SystemExit(f"--only: no record at '{out}' to rerun a part into; run every part first")
    if out.is_file() and not is_extraction_record(out):
        raise SystemExit(f"--out '{out}' exists and is not an extraction record; choose another path")
    model, task = load_model(args.model), zoo_task_for(folder)
    labels = load_labels(folder)
    index = zoo_training_index(zoo=folder)
    rows, calib = stratified(labels, np.random.default_rng(0))
    scores_path = out.with_name(f"{out.stem}_scores.parquet")
    parts = {"attacks": lambda: attack_table(model, rows, calib, index, folder, scores_path),
             "retrigger": lambda: retrigger_sweep(model, labels, index, args.retrigger_prompts, args.noise_scale,
                                                  args.retrigger_lr, args.retrigger_bound),
             "quality": lambda: quality_checks(model, task, labels, index, args.generic, args.degrade_sigma)}
    if args.only:
        record = json.loads(out.read_text())
    else:
        record = {"benchmark": "extraction", "model": model.describe(), "task": task.describe(),
                  "matcher_threshold": index.threshold}
    for part in PARTS:
        if args.only and part not in args.only:
            continue
        record[part] = parts[part]()
        atomic_write_text(out, portable_json(record))  # each finished part is kept
        print(f"{part}: written to {out}", flush=True)
    print(json.dumps({k: v for k, v in record.items() if k != "model"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
