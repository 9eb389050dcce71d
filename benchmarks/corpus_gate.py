"""Benchmark: the corpus gate (ideal-denoiser proxy, caption diversity, generator balance) of the SD-like
corpus and of the shipped zoo's collapse corpus, before any training (see diffmem/zoo/gate.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corpus_gate.py --out benchmarks/results/corpus_gate.json

About 12 minutes on one CPU thread of a busy 2-core machine. Both corpora are encoded with the shipped
zoo's VAE (the latent space the zoo trains in); ``--vae`` points at another ``AutoencoderKL`` folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from diffmem.io import atomic_write_text
from diffmem.zoo.corpus import CorpusConfig
from diffmem.zoo.gate import check_corpus, corpus_view, format_report, load_zoo_vae
from diffmem.zoo.sd_corpus import SDCorpusConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/corpus_gate.json")
    parser.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the shipped zoo's pipeline/vae)")
    parser.add_argument("--corpus", nargs="+", default=["sd", "collapse"], choices=["sd", "collapse"])
    parser.add_argument("--ssim-captions", type=int, default=200, help="captions per kind in the SSIM diversity")
    parser.add_argument("--roundtrip-images", type=int, default=512, help="images in the VAE round-trip SSIM")
    args = parser.parse_args()
    vae = load_zoo_vae(args.vae)
    configs = {"sd": SDCorpusConfig(), "collapse": CorpusConfig()}
    result: dict = {"benchmark": "corpus_gate", "vae": args.vae or "shipped zoo: diffmem/zoo/checkpoint/pipeline/vae",
                    "corpora": {},
                    "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    for name in args.corpus:
        started = time.time()
        report = check_corpus(corpus_view(name, configs[name]), vae, ssim_captions=args.ssim_captions,
                              roundtrip_images=args.roundtrip_images)
        report["config"] = dataclasses.asdict(configs[name])
        report["seconds"] = round(time.time() - started, 1)
        result["corpora"][name] = report
        print(format_report(report), flush=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
