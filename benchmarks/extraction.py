"""Benchmark: extraction attacks against the zoo's ground truth, the re-trigger attack against a
suppressing baseline, and the quality metrics' sanity checks.

1. One-step white-box, one-step black-box and generate-and-filter on a stratified subset of the zoo's
   captions: AUROC of each score, precision / recall of each flag against the labels (one-step flags:
   threshold at 1% FPR on separate generic calibration captions), extraction rate per replication
   rate, UNet calls per prompt. A generation counts as extracted when its best training match passes
   the threshold of its caption's family (single objects 0.993, scenes 0.751: the thresholds the labels
   use), so precision and recall compare like with like. Every prompt's scores and flags are written
   beside the JSON (``<out stem>_scores.parquet``), so ``diffmem eval detect`` regenerates the AUROCs.
2. Re-trigger (DoRI): memorized captions under Gaussian embedding noise (Somepalli's baseline,
   strong enough to suppress replication) before and after the attack.
3. FID with the zoo's reader features: the zoo's own samples vs a deliberately degraded copy (noise on
   the UNet weights); prompt fidelity on generic captions with fresh seeds vs the zoo's label figure.

    .venv/bin/python benchmarks/extraction.py --out benchmarks/results/extraction.json
    .venv/bin/python benchmarks/extraction.py --only-attacks   # part 1 only, into the existing record
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
from diffmem.tasks.zoo import zoo_feature_extractor, zoo_training_index
from diffmem.tasks.zoo import zoo_object_fidelity as zoo_fidelity
from diffmem.zoo.load import load_labels
from diffmem.zoo.paths import zoo_dir

SUBSET = {"signature": 100, "template": 30, "heldout_signature": 60, "heldout_template": 12, "generic": 80,
          "heldout_generic": 40, "generic_scene": 80}


def stratified(labels: list[dict], rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """The evaluation subset, and disjoint generic captions for calibrating one-step thresholds."""
    chosen, calib = [], []
    for kind, n in SUBSET.items():
        rows = [r for r in labels if r["kind"] == kind]
        order = rng.permutation(len(rows))
        chosen += [rows[i] for i in order[:n]]
        if kind == "generic":
            calib = [rows[i] for i in order[n : n + 200]]
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


def family_thresholds() -> dict[str, float]:
    """The zoo's extraction threshold of each caption family (``object``, ``scene``), as its labels use them."""
    record = json.loads((zoo_dir("collapse") / "zoo.json").read_text())
    return {family: float(t["threshold"]) for family, t in record["labels"]["thresholds"].items()}


def extracted_by_family(similarity, match_label, rows: list[dict], thresholds: dict[str, float]) -> np.ndarray:
    """The attack's matched label per prompt, kept only where the best match passes its family's threshold.

    The attack matches with the index's single threshold (the scene family's); a single-object caption's
    label needs 0.993 (an ideal generaliser's 99th percentile for that family), so a match between the two
    thresholds is not an extraction for it. NaN similarity (nothing matched) is never extracted.
    """
    sim = np.asarray(similarity, dtype=float)
    passes = np.nan_to_num(sim, nan=-np.inf) > np.array([thresholds[r["family"]] for r in rows])
    return np.where(passes, np.asarray(match_label), "none")


def attack_table(model, rows, calib, index, scores_path: Path | None = None) -> dict:
    y = np.array([r["memorized"] for r in rows])
    rates = sorted({r["replication"] for r in rows if r["kind"] == "signature"})
    thresholds = family_thresholds()
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
                                  "precision": int((extracted & y).sum()) / max(int(extracted.sum()), 1),
                                  "recall": int((extracted & y).sum()) / max(int(y.sum()), 1),
                                  "thresholds_by_family": thresholds,
                                  "matched_at_scene_threshold": int((np.array(res["match_label"]) != "none").sum())}
            entry["extraction_rate_by_replication"] = {
                str(rate): float(np.mean([e for e, r in zip(extracted, rows) if r["kind"] == "signature"
                                          and r["replication"] == rate])) for rate in rates}
            columns[f"{name} match similarity"] = pa.array(np.asarray(res["match_similarity"], float), pa.float64())
            columns[f"flagged_{name}_extracted"] = pa.array(extracted.tolist())
        results[name] = entry
    if scores_path is not None:
        table = pa.table({"id": [str(r["item_id"]) for r in rows], "text": [r["caption"] for r in rows], **columns})
        pq.write_table(table, scores_path, compression="zstd", compression_level=19)
    return {"n_prompts": len(rows), "n_memorized": int(y.sum()), "attacks": results,
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


def quality_checks(model, labels, index, n_generic: int, sigma: float) -> dict:
    generic = [r["caption"] for r in labels if r["kind"] == "generic"][::3][:n_generic]
    seeds = [1000 + i for i in range(len(generic))]
    own = model.sample(generic, seeds, num_inference_steps=25).images
    degraded = copy.copy(model)
    degraded.unet = copy.deepcopy(model.unet)
    with torch.no_grad():
        for p in degraded.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * sigma * p.std().nan_to_num(0))
    bad = degraded.sample(generic, seeds, num_inference_steps=25).images
    generic_items = {r["item_id"] for r in labels if r["kind"] == "generic"}
    real_idx = [i for i, it in enumerate(index.item_of_image.tolist()) if it in generic_items][: 2 * n_generic]
    real = index.images[real_idx]
    record = json.loads((zoo_dir("collapse") / "zoo.json").read_text())
    return {"n_generic": len(generic), "fid_zoo_vs_training_renders": fid(real, own, zoo_feature_extractor()),
            "fid_degraded_vs_training_renders": fid(real, bad, zoo_feature_extractor()),
            "degradation_sigma_times_weight_std": sigma,
            "fidelity_fresh_seeds": zoo_fidelity(own, generic), "fidelity_degraded": zoo_fidelity(bad, generic),
            "fidelity_zoo_labels": record["labels"]["generic_fidelity"]["generic"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/extraction.json")
    parser.add_argument("--retrigger-prompts", type=int, default=16)
    parser.add_argument("--noise-scale", type=float, default=1.0)
    parser.add_argument("--generic", type=int, default=300)
    parser.add_argument("--retrigger-lr", type=float, default=0.01,
                        help="DoRI's 0.1 overshoots on the zoo's embedding scale (README)")
    parser.add_argument("--retrigger-bound", type=float, default=0.3)
    parser.add_argument("--only-retrigger", action="store_true", help="rerun the re-trigger check into --out")
    parser.add_argument("--only-attacks", action="store_true", help="rerun the attack table (part 1) into --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model("zoo:collapse")
    labels = load_labels(zoo_dir("collapse"))
    index = zoo_training_index(zoo=zoo_dir("collapse"))
    rows, calib = stratified(labels, np.random.default_rng(0))
    out = Path(args.out)
    scores_path = out.with_name(f"{out.stem}_scores.parquet")
    if args.only_attacks:
        record = json.loads(out.read_text())
        record["attacks"] = attack_table(model, rows, calib, index, scores_path)
    elif args.only_retrigger:
        record = json.loads(out.read_text())
        record["retrigger"] = retrigger_check(model, labels, index, args.retrigger_prompts, args.noise_scale,
                                              args.retrigger_lr, args.retrigger_bound)
    else:
        record = {"benchmark": "extraction", "model": model.describe(), "matcher_threshold": index.threshold}
        record["attacks"] = attack_table(model, rows, calib, index, scores_path)
        record["retrigger"] = retrigger_check(model, labels, index, args.retrigger_prompts, args.noise_scale,
                                              args.retrigger_lr, args.retrigger_bound)
        record["quality"] = quality_checks(model, labels, index, args.generic, sigma=0.05)
    atomic_write_text(out, json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "model"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
