"""The held-out mitigation benchmark on a zoo's task, written to ``benchmarks/results/bench_task_<name>.json``.

The library's :func:`diffmem.bench.run_bench` on the zoo task (what ``diffmem bench`` runs): the run folder
keeps the resumable ``bench.json``; once every (seed, method) is done it is copied to the results file.

    # the SD-like zoo (zoo:sd, the default zoo), the collapse zoo's dev-chosen retain weight (nothing tuned here)
    python benchmarks/bench_task.py --name sd --model zoo:sd --methods random-tokens adversarial-finetune \
        --tune adversarial-finetune.retain_weight=100 --size fit=32 --size dev=8 --size test=24 --size ordinary_test=32
    # the collapse zoo: model-derived surrogates (the default), 2 split seeds, the tuned re-trigger
    python benchmarks/bench_task.py --name model --methods random-tokens adversarial-finetune
    # the oracle-surrogate ablation (the zoo's renderer; information no real checkpoint has)
    python benchmarks/bench_task.py --name oracle --methods adversarial-finetune --surrogates oracle
    # only the surrogate step on each seed's fit split: how many pass the copy check, what they draw
    python benchmarks/bench_task.py --name surrogates --surrogates-only
    # the scene-fidelity reader checked on the zoo's training images (through its VAE)
    python benchmarks/bench_task.py --name scene_check --scene-check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results file suffix: bench_task_<name>.json")
    parser.add_argument("--model", default="zoo:collapse",
                        help="a zoo (name or folder); its corpus picks the task (default: zoo:collapse, the zoo of "
                             "the files written before the SD-like zoo)")
    parser.add_argument("--methods", nargs="+", default=["random-tokens", "adversarial-finetune"])
    parser.add_argument("--seeds", nargs="+", default=["0", "1"])
    parser.add_argument("--surrogates", choices=("model", "oracle"), default="model")
    parser.add_argument("--tune", action="append", default=[], help="METHOD.KEY=V1,V2 chosen on dev")
    parser.add_argument("--work", default=None, help="run folder (default: runs/bench_task_<name>)")
    parser.add_argument("--size", action="append", default=None,
                        help="SPLIT=N (default: test=24, ordinary_test=32: sized for a shared 2-core machine)")
    parser.add_argument("--samples", default="2", help="generations per prompt (default: 2)")
    parser.add_argument("--attack-prompts", default="8", help="test prompts under the re-trigger (default: 8)")
    parser.add_argument("--surrogates-only", action="store_true",
                        help="measure only the model-derived surrogates of each seed's fit split")
    parser.add_argument("--scene-check", action="store_true",
                        help="check the zoo task's scene fidelity on the training images of memorized captions")
    args = parser.parse_args()
    if args.scene_check:
        scene_check(args)
        return
    if args.surrogates_only:
        surrogate_stats(args)
        return
    from diffmem.io import atomic_write_text
    from diffmem.provenance import portable_json

    work = Path(args.work or f"runs/bench_task_{args.name}")
    record = run_zoo_bench(args, work)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"bench_task_{args.name}.json", portable_json(record))
    print(json.dumps(record["results"], indent=1, default=str))
    print(f"results: {RESULTS / f'bench_task_{args.name}.json'}")


def _value(text: str):
    """One option value: JSON when it parses (numbers, booleans, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_zoo_bench(args: argparse.Namespace, work: Path) -> dict:
    """``diffmem.bench.run_bench`` on the task of ``--model``'s zoo with the tuned re-trigger (lr 0.01, relative
    norm 0.3), resumable in ``work`` (each finished (seed, method) is kept)."""
    from diffmem.bench import BenchSettings, run_bench
    from diffmem.models import load_model
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.tasks import SplitSizes
    from diffmem.tasks.zoo import zoo_task_for
    from diffmem.zoo.load import zoo_folder_for

    given = args.size or ["test=24", "ordinary_test=32"]
    sizes = SplitSizes(**{k: int(v) for k, v in (s.split("=", 1) for s in given)})
    tune: dict[str, dict[str, list]] = {}
    for item in args.tune:  # METHOD.KEY=V1,V2
        scoped, values = item.split("=", 1)
        method, key = scoped.split(".", 1)
        tune.setdefault(method, {})[key] = [_value(v) for v in values.split(",")]
    settings = BenchSettings(sizes=sizes, split_seeds=tuple(map(int, args.seeds)), samples=int(args.samples),
                             attack_prompts=int(args.attack_prompts), surrogates=args.surrogates,
                             retrigger={"lr": 0.01, "max_relative_norm": 0.3}, tune=tune)
    check_output_dir(work, "bench", [], writes=["bench.json"])
    zoo = zoo_folder_for(args.model)
    if zoo is None:
        raise SystemExit(f"--model '{args.model}' is not a zoo (a zoo name such as zoo:sd, or a zoo folder)")
    model, task = load_model(args.model), zoo_task_for(zoo)
    claim_output_dir(work, "bench", ["bench.json"])
    return run_bench(model, task, args.methods, work, settings)


def surrogate_stats(args: argparse.Namespace) -> None:
    """Per split seed: kept / rejected surrogates (random tokens, 4 candidates, checked against the zoo's
    training index) and the scene fidelity of the surrogates beside the original model's generations."""
    from diffmem.io import atomic_write_text
    from diffmem.jobs import versions
    from diffmem.mitigators.surrogates import make_surrogates
    from diffmem.models import load_model
    from diffmem.provenance import portable_json
    from diffmem.tasks.zoo import ZooTask

    model, task = load_model("zoo:collapse"), ZooTask()
    index = task.training_index(model)
    record = {"what": "model-derived surrogates (random-tokens, 4 candidates) of each seed's memorized fit split",
              "seeds": {}, "versions": versions()}
    for seed in map(int, args.seeds):
        started = time.perf_counter()
        split = task.splits(seed)
        prompts = [p.caption for p in split.fit]
        sset = make_surrogates(model, prompts, split.ordinary_fit, index=index, seed=seed)
        original = model.sample(prompts, [seed] * len(prompts), num_inference_steps=25).images
        kept = [prompts[i] for i in sset.kept]
        record["seeds"][str(seed)] = sset.describe() | {
            "scene_fidelity_surrogates": task.fidelity(sset.images, kept)["all"] if kept else None,
            "scene_fidelity_original_same_prompts": task.fidelity(original[sset.kept], kept)["all"] if kept else None,
            "extraction_original_seed0": task.label_extraction(model, original, [p.item for p in split.fit]).rates(),
            "seconds": round(time.perf_counter() - started, 1)}
        RESULTS.mkdir(exist_ok=True)
        atomic_write_text(RESULTS / f"bench_task_{args.name}.json", portable_json(record))
    print(json.dumps(record["seeds"], indent=2))


def scene_check(args: argparse.Namespace) -> None:
    """Share of named objects the scene reader finds in the training images (through the zoo's VAE) of the
    memorized captions, for their own caption and for the next caption's objects (a wrong caption)."""
    import numpy as np

    from diffmem.io import atomic_write_text
    from diffmem.provenance import portable_json
    from diffmem.tasks.zoo import ZooTask, parse_scene_caption, scene_object_present
    from diffmem.zoo.load import zoo_training_set
    from diffmem.zoo.paths import zoo_dir

    task, ts = ZooTask(), zoo_training_set(zoo_dir("collapse"))
    rows = task.memorized()
    images = ts.reference[[ts.images_of_item[p.item][0] for p in rows]]
    own, other = [], []
    for i, p in enumerate(rows):
        wrong = parse_scene_caption(rows[(i + 1) % len(rows)].caption)[0]
        for colour, _, position in parse_scene_caption(p.caption)[0]:
            own.append(bool(scene_object_present(images[i : i + 1], colour, position)[0]))
        for colour, _, position in wrong:
            if (colour, position) not in {(c, q) for c, _, q in parse_scene_caption(p.caption)[0]}:
                other.append(bool(scene_object_present(images[i : i + 1], colour, position)[0]))
    record = {"what": "scene fidelity's per-object check on the training images (through the zoo's VAE) of the "
                      "memorized captions", "captions": len(rows),
              "own_objects": len(own), "own_objects_found": float(np.mean(own)),
              "other_caption_objects": len(other), "other_caption_objects_found": float(np.mean(other))}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"bench_task_{args.name}.json", portable_json(record))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    run()
