"""``diffmem bench``: every mitigator on one benchmark task, measured the same way, held out.

The task (:mod:`diffmem.tasks`: the zoo by default, or a user's checkpoint with a memorized list, an
ordinary list and an optional image folder) owns the data; this module knows nothing of it. For each
split seed the task cuts disjoint fit / dev / test splits of memorized and of ordinary prompts, then
for each method (and the unmitigated model):

1. **fit** on the fit split (memorized prompts + ordinary reference prompts). Adversarial fine-tuning
   steers towards *model-derived* surrogates (:mod:`diffmem.mitigators.surrogates`) checked against the
   task's training index; ``surrogates="oracle"`` uses the task's ground-truth renders instead (zoo
   only; an ablation, never the default);
2. **tune** (optional, ``tune={method: {option: [values]}}``): every candidate setting is fitted and
   measured on the *dev* split; the rule picks the setting (extraction <= 5% and <= 10% under the
   re-trigger, then the highest ordinary fidelity; if none passes, the lowest extraction + re-trigger);
3. **report** the chosen setting on the *test* split: extraction rate on memorized prompts (split into
   matching / template verbatim) under plain generation and under two adaptive embedding re-triggers:
   DoRI at the paper's settings (``dori_extraction_rate``, the default re-trigger: Adam lr 0.1, batch 8,
   50 steps, no bound, 3 starts) and diffmem's earlier tuned attack (``tuned_retrigger_extraction_rate``:
   lr 0.01, 30 steps, relative bound 0.3, one start; bench files before this change stored it as
   ``retrigger_extraction_rate``, read back by :func:`~diffmem.bench_results.upgrade_result`), the task's
   fidelity per caption family for memorized prompts after mitigation (what the patched model now draws
   for them) and for ordinary prompts, FID (when the task has features) and diversity on ordinary prompts,
   the first-step noise-norm on memorized prompts, fit time and the number of parameters changed.

``bench.json`` holds every (seed, method) result under ``runs`` (written after each, resumable), the
mean and standard deviation over seeds under ``results`` and what was tuned on what under ``protocol``.
"""

from __future__ import annotations

import inspect
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.attacks import AttackContext, make_attack
from diffmem.attacks.base import TrainingIndex
from diffmem.bench_results import REATTACKS, reattack_rate, upgrade_result
from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.eval.quality import diversity, fid
from diffmem.io import atomic_write_text
from diffmem.jobs import versions
from diffmem.mitigators import make_mitigator
from diffmem.mitigators.base import InferenceMitigator, Mitigator
from diffmem.models.model import DiffusionModel
from diffmem.scan import score_chunk
from diffmem.tasks.base import BenchTask, MemorizedPrompt, SplitSizes, TaskSplits

DEFAULT_METHODS = ("embedding-noise", "random-tokens", "prompt-adaptation", "subspace-pruning", "nemo",
                   "adversarial-finetune", "adversarial-finetune-lora")
TARGET_EXTRACTION = 0.05
TARGET_RETRIGGER = 0.10
SURROGATE_MODES = ("model", "oracle")


@dataclass
class BenchSettings:
    """Sizes of the benchmark (defaults sized for a 2-core CPU) and the protocol."""

    sizes: SplitSizes = field(default_factory=SplitSizes)
    split_seeds: tuple[int, ...] = (0, 1)
    samples: int = 3  # generations per prompt
    steps: int = 25
    attack_prompts: int = 16
    dev_attack_prompts: int = 8
    attack_steps: int = 30
    surrogates: str = "model"  # "model" (the default) or "oracle" (the task's renderer; ablation)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per mitigator
    tune: dict[str, dict[str, list]] = field(default_factory=dict)  # per mitigator: option -> candidates (dev)
    retrigger: dict[str, Any] = field(default_factory=dict)  # the tuned re-trigger's settings (second row)
    dori: dict[str, Any] = field(default_factory=dict)  # DoRI's settings (the paper's by default)

    def __post_init__(self) -> None:
        if self.surrogates not in SURROGATE_MODES:
            raise ValueError(f"surrogates must be one of {SURROGATE_MODES}, got {self.surrogates!r}")
        if self.samples < 2:
            raise ValueError("samples must be >= 2 (diversity compares generations of one prompt)")


def _repeat(items: list, k: int) -> list:
    return [x for x in items for _ in range(k)]


def _flat(prefix: str, values: dict[str, float | None]) -> dict[str, float | None]:
    return {f"{prefix}_{k}": v for k, v in values.items()}


def headline_fidelity(values: dict[str, float | None]) -> float | None:
    """The one fidelity figure of a family dict: ``all`` (zoo) or ``clip_score`` (open_clip), else None."""
    return values.get("all", values.get("clip_score"))


def measure(model: DiffusionModel, original: DiffusionModel, task: BenchTask, memorized: list[MemorizedPrompt],
            ordinary: list[str], settings: BenchSettings, seed: int, attack_prompts: int,
            full: bool = True) -> dict[str, Any]:
    """Every figure of one (patched) model on one split; ``full=False`` skips FID and the noise-norm (dev)."""
    index: TrainingIndex = task.training_index(original)
    k = settings.samples
    captions = [p.caption for p in memorized]
    gen_seeds = [seed + j for _ in memorized for j in range(k)]
    images = model.sample(_repeat(captions, k), gen_seeds, num_inference_steps=settings.steps).images
    out: dict[str, Any] = task.label_extraction(original, images, _repeat([p.item for p in memorized], k)).rates()
    mem_fidelity = task.fidelity(images, _repeat(captions, k))
    rows = memorized[:attack_prompts]
    for name, key in REATTACKS:
        options = {"generations": 2, "sample_steps": settings.steps}
        options |= ({"steps": settings.attack_steps} | settings.retrigger) if name == "retrigger" else settings.dori
        res = make_attack(name, **options).run(model, [p.caption for p in rows],
                                               AttackContext(index=index, own_items=[p.item for p in rows], seed=seed))
        out[key] = float(np.mean(res["replication_rate"]))
    gen = model.sample(_repeat(ordinary, k), [seed + j for _ in ordinary for j in range(k)],
                       num_inference_steps=settings.steps).images
    ord_fidelity = task.fidelity(gen, _repeat(ordinary, k))
    out["fidelity"] = headline_fidelity(ord_fidelity)
    out |= _flat("fidelity_ordinary", ord_fidelity) | _flat("fidelity_memorized", mem_fidelity)
    out["diversity"] = diversity(gen, k)
    if full:
        features, reference = task.fid_features(), task.fid_reference(original)
        out["fid"] = fid(reference, gen, features) if features is not None and reference is not None else None
        engine = NoiseStepEngine(model, 4, seed)
        out["noise_norm_memorized"] = float(np.mean(score_chunk(engine, [make_detector("noise-norm")],
                                                                captions)["noise-norm"]))
    return out


def changed_parameters(a: torch.nn.Module, b: torch.nn.Module) -> int:
    return int(sum((pa != pb).sum() for pa, pb in zip(a.state_dict().values(), b.state_dict().values())))


def fit_method(name: str, options: dict[str, Any], model: DiffusionModel, task: BenchTask, split: TaskSplits,
               settings: BenchSettings) -> tuple[DiffusionModel, Mitigator, int, float]:
    """Fit ``name`` on the fit split; returns the patched model, the mitigator, parameters changed, seconds."""
    torch.manual_seed(split.seed)
    started = time.perf_counter()
    mitigator = make_mitigator(name, **options)
    params = inspect.signature(mitigator.fit).parameters
    extra: dict[str, Any] = {}
    if "surrogates" in params and settings.surrogates == "oracle":
        extra["surrogates"] = task.oracle_surrogates(split.fit)
    if "index" in params:
        extra["index"] = task.training_index(model)
    if "content" in params:
        extra["content"] = task.content_flags  # returns None when the task has no per-image fidelity
    if "statistics_prompts" in params:  # NeMo's activation statistics: the memorized captions' distribution
        extra["statistics_prompts"] = task.statistics_prompts(split)
    mitigator.fit(model, [p.caption for p in split.fit], split.ordinary_fit, **extra)
    if isinstance(mitigator, InferenceMitigator):
        patched, changed = mitigator.apply(model), 0
    else:
        patched = mitigator.patched()
        changed = changed_parameters(model.unet, patched.unet)
    return patched, mitigator, changed, time.perf_counter() - started


def choose(dev: list[dict[str, Any]]) -> int:
    """The tuning rule: among settings meeting both extraction targets on dev, the highest ordinary
    fidelity; if none meets them, the lowest extraction + re-trigger rate (fidelity breaks ties). The
    re-trigger rate is DoRI's (:func:`reattack_rate`)."""
    def fid_of(r: dict) -> float:
        return r["fidelity"] if r["fidelity"] is not None else 0.0

    ok = [i for i, r in enumerate(dev) if r["extraction_rate"] <= TARGET_EXTRACTION
          and reattack_rate(r) <= TARGET_RETRIGGER]
    if ok:
        return max(ok, key=lambda i: fid_of(dev[i]))
    return min(range(len(dev)), key=lambda i: (dev[i]["extraction_rate"] + reattack_rate(dev[i]), -fid_of(dev[i])))


def grid(tune: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the candidate values (one empty setting when nothing is tuned)."""
    keys = sorted(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def summarise(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over split seeds of every numeric figure, per method."""
    methods: dict[str, list[dict]] = {}
    for per_seed in runs.values():
        for name, r in per_seed.items():
            methods.setdefault(name, []).append(upgrade_result(r))
    out: dict[str, dict[str, Any]] = {}
    for name, rs in methods.items():
        row: dict[str, Any] = {"seeds": len(rs), "acts_at": rs[0].get("acts_at")}
        for key, value in rs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
                row[key] = float(np.mean(vals))
                row[f"{key}_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        out[name] = row
    return out


def run_bench(model: DiffusionModel, task: BenchTask, methods: list[str], out_dir: str | Path,
              settings: BenchSettings | None = None) -> dict[str, Any]:
    """Fit, tune on dev and measure on test every method for every split seed; ``bench.json`` is written
    after each (seed, method) and a rerun skips those already there."""
    settings = settings or BenchSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.setdefault("runs", {})
    record |= {"model": model.describe(), "task": task.describe(), "settings": asdict(settings),
               "versions": versions()}
    protocol = record.setdefault("protocol", {})
    protocol |= {"fit": "memorized fit split + ordinary fit split (the methods' inputs)",
                 "dev": "settings listed under 'tuned' chosen on the dev split by the rule in diffmem.bench.choose",
                 "test": "every figure under 'runs' and 'results' is measured on the test split",
                 "surrogates": settings.surrogates, "splits": {}, "tuned": protocol.get("tuned", {})}
    task.training_index(model)  # built once, from the unmitigated model (a folder task's pseudo index needs it)
    for seed in settings.split_seeds:
        split = task.splits(seed, settings.sizes)
        protocol["splits"][str(seed)] = split.describe()
        runs = record["runs"].setdefault(str(seed), {})
        for name in ["none", *methods]:
            if name in runs:
                continue
            if name == "none":
                patched, changed, fit_s, fit_info, acts_at = model, 0, 0.0, {}, "-"
            else:
                base = settings.options.get(name, {})
                candidates = grid(settings.tune.get(name, {}))
                fitted = []
                for cand in candidates:
                    fitted.append(fit_method(name, base | cand, model, task, split, settings))
                if len(candidates) > 1:
                    dev = [measure(f[0], model, task, split.dev, split.ordinary_dev, settings, seed,
                                   settings.dev_attack_prompts, full=False) for f in fitted]
                    best = choose(dev)
                    protocol["tuned"].setdefault(name, {})[str(seed)] = {
                        "grid": settings.tune[name], "on": "dev", "dev": [c | d for c, d in zip(candidates, dev)],
                        "chosen": candidates[best]}
                else:
                    best = 0
                patched, mitigator, changed, fit_s = fitted[best]
                fit_info = {k: v for k, v in mitigator.describe_fit().items() if k != "neurons"}
                fit_info["options"] = base | candidates[best]
                acts_at = mitigator.acts_at
            result = measure(patched, model, task, split.test, split.ordinary_test, settings, seed,
                             settings.attack_prompts)
            result |= {"fit_seconds": round(fit_s, 1), "parameters_changed": changed, "acts_at": acts_at,
                       "fit": fit_info}
            runs[name] = result
            record["results"] = summarise(record["runs"])
            atomic_write_text(path, json.dumps(record, indent=2, default=str))
    record["results"] = summarise(record["runs"])
    atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return record
