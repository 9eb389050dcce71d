"""Benchmark: noise-step scan throughput, four ways, measured in one run on the same prompts.

1. naive: one prompt per call, a conditional + unconditional pair per noise draw;
2. batched pairs: many prompts per call, each with its own unconditional branch (2B per call);
3. engine: diffmem's NoiseStepEngine (unconditional once per draw, cached; conditionals batched);
4. conditional forwards alone (the floor any method that reads eps_c must pay).

    .venv/bin/python benchmarks/scan_throughput.py --out benchmarks/results/scan_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffmem.detectors import NoiseStepEngine, make_detector
from diffmem.detectors.noise_norm import guidance_norm
from diffmem.io import atomic_write_text
from diffmem.models import load_model
from diffmem.scan import score_chunk


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/scan_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    from diffmem.cli.scan_commands import zoo_prompts

    texts = zoo_prompts().texts[: args.prompts]
    engine_ref = NoiseStepEngine(model, args.draws)
    x, t0 = engine_ref.latents, engine_ref.timestep(0)
    emb_all = model.encode_prompts(texts)
    model.empty_embedding()

    def naive():
        out = []
        for i in range(len(texts)):
            per = [guidance_norm(*reversed(model.guided_pair(x[j : j + 1], t0, emb_all[i : i + 1])))
                   for j in range(args.draws)]
            out.append(torch.cat(per).mean())
        return torch.stack(out)

    def batched_pairs():
        out = []
        for s in range(0, len(texts), args.batch_size):
            emb = emb_all[s : s + args.batch_size]
            lat = x.repeat(len(emb), 1, 1, 1)
            eps_u, eps_c = model.guided_pair(lat, t0, emb.repeat_interleave(args.draws, 0))
            out.append(guidance_norm(eps_c, eps_u).view(len(emb), args.draws).mean(1))
        return torch.cat(out)

    def engine():
        eng = NoiseStepEngine(model, args.draws)
        det = [make_detector("noise-norm")]
        return torch.cat([torch.from_numpy(score_chunk(eng, det, texts[s : s + args.batch_size])["noise-norm"])
                          for s in range(0, len(texts), args.batch_size)])

    def cond_only():
        for s in range(0, len(texts), args.batch_size):
            emb = emb_all[s : s + args.batch_size]
            model.predict_noise(x.repeat(len(emb), 1, 1, 1), t0, emb.repeat_interleave(args.draws, 0))

    engine()  # warm-up (allocator, kernels)
    results = {}
    for name, fn in [("naive_per_prompt_pairs", naive), ("batched_pairs", batched_pairs), ("engine", engine),
                     ("conditional_forwards_only", cond_only)]:
        seconds, out = _timed(fn)
        results[name] = {"seconds": round(seconds, 3), "prompts_per_second": round(len(texts) / seconds, 2)}
        if out is not None:
            results[name]["_scores"] = out.double()
    ref = results["engine"].pop("_scores")
    for name in ("naive_per_prompt_pairs", "batched_pairs"):
        other = results[name].pop("_scores")
        results[name]["max_abs_diff_vs_engine"] = float((other - ref).abs().max())
    e = results["engine"]["seconds"]
    record = {"benchmark": "scan_throughput", "model": model.describe(), "prompts": len(texts), "draws": args.draws,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "results": results,
              "ratios": {"naive_over_engine": round(results["naive_per_prompt_pairs"]["seconds"] / e, 2),
                         "batched_pairs_over_engine": round(results["batched_pairs"]["seconds"] / e, 2),
                         "engine_over_conditional_only": round(e / results["conditional_forwards_only"]["seconds"], 3)}}
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))
    print(json.dumps(record["ratios"], indent=2))


if __name__ == "__main__":
    main()
