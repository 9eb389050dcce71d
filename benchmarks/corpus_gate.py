"""Benchmark: the corpus gate (ideal-denoiser proxy, caption diversity, generator balance) of the SD-like
corpus and of the shipped zoo's collapse corpus, before any training (see diffmem/zoo/gate.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corpus_gate.py --out benchmarks/results/corpus_gate.json

About 27 minutes in the recorded run (one CPU thread of a busy 2-core machine; ``seconds`` per corpus in
the JSON). Both corpora are encoded with the shipped zoo's VAE (the latent space the zoo trains in);
``--vae`` points at another ``AutoencoderKL`` folder. The SD corpus also gets the shipped attribute
reader's read-back on its ordinary training images.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import torch

from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json
from diffmem.zoo.corpus import CorpusConfig
from diffmem.zoo.gate import check_corpus, corpus_view, format_report, load_zoo_vae
from diffmem.zoo.sd_corpus import SDCorpusConfig


def shipped_reader_on_sd(per_caption: int = 3, seed: int = 0) -> dict:
    """Share of the SD corpus's ordinary training images whose main object the *shipped* attribute reader
    reads back (``per_caption`` images of every ordinary caption): can today's fidelity metric be reused?"""
    import numpy as np

    from diffmem.zoo.attributes import AttributeReader
    from diffmem.zoo.paths import zoo_dir
    from diffmem.zoo.sd_corpus import build_sd_corpus, render_sd_item

    reader = AttributeReader.load(zoo_dir("collapse") / "attribute_reader")
    rng = np.random.default_rng(seed)
    images, mains = [], []
    for item in (it for it in build_sd_corpus() if it.kind == "generic"):
        for copy in rng.permutation(len(item.image_seeds))[:per_caption].tolist():
            images.append(render_sd_item(item, copy))
            mains.append(item.scene(copy).main)
    read = reader.read(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0)
    out = {k: round(float(np.mean([r == getattr(m, k) for r, m in zip(read[k], mains)])), 4)
           for k in ("shape", "color", "position", "size")}
    return {"n_images": len(images), "read_back": out}


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
        if name == "sd":
            report["shipped_attribute_reader"] = shipped_reader_on_sd()
        result["corpora"][name] = report
        print(format_report(report), flush=True)
    atomic_write_text(Path(args.out), portable_json(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
