"""Benchmark: extraction attacks against the zoo's ground truth, the re-trigger attack against a
suppressing baseline, and the quality metrics' sanity checks.

1. One-step white-box, one-step black-box and generate-and-filter on a stratified subset of the zoo's
   captions: AUROC of each score, precision / recall of each flag against the labels (one-step flags:
   threshold at 1% FPR on separate generic calibration captions), extraction rate per replication
   rate, UNet calls per prompt.
2. Re-trigger (DoRI): memorized captions under Gaussian embedding noise (Somepalli's baseline,
   strong enough to suppress replication) before and after the attack.
3. FID with the zoo's reader features: the zoo's own samples vs a deliberately degraded copy (noise on
   the UNet weights); prompt fidelity on generic captions with fresh seeds vs the zoo's label figure.

    .venv/bin/python benchmarks/extraction.py --out benchmarks/results/extraction.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from diffmem.attacks import AttackContext, make_attack
from diffmem.eval.detection import threshold_at_fpr
from diffmem.eval.quality import fid, zoo_fidelity
from diffmem.extract import zoo_training_index
from diffmem.io import atomic_write_text
from diffmem.mitigators import make_mitigator
from diffmem.models import load_model
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


def attack_table(model, rows, calib, index) -> dict:
    y = np.array([r["memorized"] for r in rows])
    rates = sorted({r["replication"] for r in rows if r["kind"] == "signature"})
    results = {}
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
                                       for k in SUBSET}}
        if "match_label" in res:
            labels = np.array(res["match_label"])
            extracted = labels != "none"
            entry["extracted"] = {"matching_verbatim": int((labels == "matching_verbatim").sum()),
                                  "template_verbatim": int((labels == "template_verbatim").sum()),
                                  "precision": int((extracted & y).sum()) / max(int(extracted.sum()), 1),
                                  "recall": int((extracted & y).sum()) / max(int(y.sum()), 1)}
            entry["extraction_rate_by_replication"] = {
                str(rate): float(np.mean([e for e, r in zip(extracted, rows) if r["kind"] == "signature"
                                          and r["replication"] == rate])) for rate in rates}
        results[name] = entry
    return {"n_prompts": len(rows), "n_memorized": int(y.sum()), "attacks": results}


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
    record = json.loads((zoo_dir() / "zoo.json").read_text())
    return {"n_generic": len(generic), "fid_zoo_vs_training_renders": fid(real, own),
            "fid_degraded_vs_training_renders": fid(real, bad), "degradation_sigma_times_weight_std": sigma,
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
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model()
    labels = load_labels(zoo_dir())
    index = zoo_training_index()
    rows, calib = stratified(labels, np.random.default_rng(0))
    retrigger = retrigger_check(model, labels, index, args.retrigger_prompts, args.noise_scale, args.retrigger_lr,
                                args.retrigger_bound)
    if args.only_retrigger:
        record = json.loads(Path(args.out).read_text())
        record["retrigger"] = retrigger
    else:
        record = {"benchmark": "extraction", "model": model.describe(), "matcher_threshold": index.threshold}
        record["attacks"] = attack_table(model, rows, calib, index)
        record["retrigger"] = retrigger
        record["quality"] = quality_checks(model, labels, index, args.generic, sigma=0.05)
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "model"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
