"""``diffmem bench``: every mitigator on the zoo, measured the same way, in one table.

For each method (and the unmitigated model): fit on the zoo's memorized prompts and ordinary
(generic) reference prompts, then measure on held-apart evaluation prompts:

- extraction rate on memorized prompts (share of generations that match a training image above the
  zoo's threshold), split into matching verbatim and template verbatim, under plain generation and
  under the adaptive embedding re-trigger attack (DoRI) starting from each prompt;
- quality on generic prompts: prompt fidelity (attribute reader), FID against training renders with
  the reader's features, diversity across seeds;
- the first-step noise-norm after the patch (mean over memorized prompts);
- compute time of the fit and the number of parameters changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.attacks import AttackContext, make_attack
from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.eval.quality import diversity, fid, zoo_fidelity
from diffmem.io import atomic_write_text
from diffmem.jobs import versions
from diffmem.mitigators import make_mitigator
from diffmem.mitigators.base import InferenceMitigator
from diffmem.models.model import DiffusionModel
from diffmem.scan import score_chunk

DEFAULT_METHODS = ("embedding-noise", "random-tokens", "prompt-adaptation", "subspace-pruning", "nemo",
                   "adversarial-finetune")


@dataclass
class BenchSettings:
    """Sizes of the benchmark (defaults sized for a 2-core CPU)."""

    memorized_fit: int = 40
    memorized_eval: int = 40
    generic_eval: int = 64
    ordinary_ref: int = 128
    seeds: int = 3
    steps: int = 25
    attack_prompts: int = 16
    attack_steps: int = 30
    seed: int = 0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per mitigator
    retrigger: dict[str, Any] = field(default_factory=dict)  # the adaptive attack's settings (DoRI's by default)


def split_zoo_prompts(settings: BenchSettings) -> dict[str, list]:
    """Memorized signature/template captions split into fit and eval halves; generic eval and reference sets."""
    from diffmem.zoo.load import load_labels
    from diffmem.zoo.paths import zoo_dir

    labels = load_labels(zoo_dir())
    mem = [r for r in labels if r["memorized"] and r["kind"] in ("signature", "template")]
    rng = np.random.default_rng(settings.seed)
    mem = [mem[i] for i in rng.permutation(len(mem))]
    half = len(mem) // 2
    generic = [r for r in labels if r["kind"] in ("generic", "heldout_generic") and not r["memorized"]]
    generic = [generic[i] for i in rng.permutation(len(generic))]
    scenes = [r for r in labels if r["kind"] == "generic_scene" and not r["memorized"]]
    scenes = [scenes[i] for i in rng.permutation(len(scenes))]
    # ordinary references of both caption families (half scenes when the zoo has ordinary scenes), so
    # that what a method learns to remove is memorization, not "scene captions"
    n_scenes = min(len(scenes), settings.ordinary_ref // 2)
    n_objects = settings.ordinary_ref - n_scenes
    reference = [r["caption"] for r in generic[:n_objects]] + [r["caption"] for r in scenes[:n_scenes]]
    return {"fit": mem[:half][: settings.memorized_fit], "eval": mem[half:][: settings.memorized_eval],
            "reference": reference,
            "generic_eval": [r["caption"] for r in generic[n_objects:][: settings.generic_eval]]}


def extraction_rates(model: DiffusionModel, rows: list[dict], index, settings: BenchSettings) -> dict[str, float]:
    k = settings.seeds
    images = model.sample([r["caption"] for r in rows for _ in range(k)], [settings.seed + j for _ in rows
                                                                           for j in range(k)],
                          num_inference_steps=settings.steps).images
    m = index.matcher.match(images)
    hit = (m.similarity > index.threshold).numpy()
    items = index.item_of_image[m.index.numpy()]
    own = np.repeat([r["item_id"] for r in rows], k)
    return {"extraction_rate": float(hit.mean()), "matching_verbatim": float((hit & (items == own)).mean()),
            "template_verbatim": float((hit & (items != own)).mean())}


def surrogate_images(rows: list[dict]) -> torch.Tensor:
    """Independent renders of each memorized caption (fresh texture and jitter): non-replicating targets."""
    import dataclasses

    from diffmem.zoo.corpus import render
    from diffmem.zoo.load import load_corpus
    from diffmem.zoo.paths import zoo_dir

    items = load_corpus(zoo_dir())
    rng = np.random.default_rng(777)
    out = []
    for r in rows:
        spec = items[r["item_id"]].spec
        spec = dataclasses.replace(spec, texture_seed=int(rng.integers(2**31)))
        out.append(render(spec, int(rng.integers(2**31))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def measure(model: DiffusionModel, split: dict, index, settings: BenchSettings, real_generic: torch.Tensor
            ) -> dict[str, Any]:
    out: dict[str, Any] = extraction_rates(model, split["eval"], index, settings)
    attack = make_attack("retrigger", **({"steps": settings.attack_steps, "generations": 2,
                                          "sample_steps": settings.steps} | settings.retrigger))
    rows = split["eval"][: settings.attack_prompts]
    res = attack.run(model, [r["caption"] for r in rows],
                     AttackContext(index=index, own_items=[r["item_id"] for r in rows], seed=settings.seed))
    out["retrigger_extraction_rate"] = float(np.mean(res["replication_rate"]))
    k = settings.seeds
    gen = model.sample([c for c in split["generic_eval"] for _ in range(k)],
                       [settings.seed + j for _ in split["generic_eval"] for j in range(k)],
                       num_inference_steps=settings.steps).images
    out["fidelity"] = zoo_fidelity(gen, [c for c in split["generic_eval"] for _ in range(k)])
    out["fid"] = fid(real_generic, gen)
    out["diversity"] = diversity(gen, k)
    engine = NoiseStepEngine(model, 4, settings.seed)
    out["noise_norm_memorized"] = float(np.mean(score_chunk(engine, [make_detector("noise-norm")],
                                                            [r["caption"] for r in split["eval"]])["noise-norm"]))
    return out


def changed_parameters(a: torch.nn.Module, b: torch.nn.Module) -> int:
    return int(sum((pa != pb).sum() for pa, pb in zip(a.state_dict().values(), b.state_dict().values())))


def run_bench(model: DiffusionModel, methods: list[str], out_dir: str | Path,
              settings: BenchSettings = BenchSettings()) -> dict[str, Any]:
    """Fit and measure every method; writes ``bench.json`` after each method (resumable by method)."""
    from diffmem.extract import zoo_training_index
    from diffmem.zoo.load import load_labels
    from diffmem.zoo.paths import zoo_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    record = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    record |= {"model": model.describe(), "settings": settings.__dict__, "versions": versions()}
    split = split_zoo_prompts(settings)
    index = zoo_training_index()
    generic_items = {r["item_id"] for r in load_labels(zoo_dir()) if r["kind"] == "generic"}
    generic_idx = [i for i, it in enumerate(index.item_of_image.tolist()) if it in generic_items][::4][:1000]
    real_generic = index.images[generic_idx]
    memorized_fit = [r["caption"] for r in split["fit"]]
    for name in ["none", *methods]:
        if name in record["results"]:
            continue
        torch.manual_seed(settings.seed)
        started = time.perf_counter()
        if name == "none":
            patched, changed, fit_info = model, 0, {}
        else:
            mitigator = make_mitigator(name, **settings.options.get(name, {}))
            if name == "adversarial-finetune":
                mitigator.fit(model, memorized_fit, split["reference"], surrogates=surrogate_images(split["fit"]))
            else:
                mitigator.fit(model, memorized_fit, split["reference"])
            if isinstance(mitigator, InferenceMitigator):
                patched, changed = mitigator.apply(model), 0
            else:
                patched = mitigator.patched()
                changed = changed_parameters(model.unet, patched.unet)
            fit_info = mitigator.describe_fit()
        fit_seconds = time.perf_counter() - started
        result = measure(patched, split, index, settings, real_generic)
        result |= {"fit_seconds": round(fit_seconds, 1), "parameters_changed": changed,
                   "acts_at": "-" if name == "none" else mitigator.acts_at,
                   "fit": {k: v for k, v in fit_info.items() if k != "neurons"}}
        record["results"][name] = result
        atomic_write_text(path, json.dumps(record, indent=2, default=str))
    return record
