"""Probe a zoo build while it trains: does the denoiser reproduce its duplicated images yet?

Reads a build's work folder (``diffmem zoo build --work-dir``) without touching it: the VAE checkpoint, the
tokenizer and the denoiser checkpoint's EMA weights (what the finished zoo will ship), and generates every
signature caption (``kind == "signature"``, the duplicated titles at each rate) with ``--seeds`` seeds, as the
labeller does (DDIM, CFG 7.5). For each rate it reports the SSIM of each generation with the caption's own
training image (through the same VAE, as labels compare them), median and the share above ``--ssim``. It
answers, in a few minutes and before labelling, the question that decided the first SD-like build: is the
16x/64x own-image SSIM rising with the steps while the 1x one stays low?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoo_build_probe.py --work-dir runs/zoo-sd-build2 \
        --out runs/probe.json

The JSON appends one entry per call (keyed by the checkpoint's step) so repeated probes form a curve. With
``--reader`` (an SD attribute reader folder) it also reads back the factors that ordinary captions name (style,
position, size, with colour and shape), the fidelity gate, on a sample of captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.io import atomic_write_text
from diffmem.provenance import portable_json


def _load_work(work: Path):
    """The work folder's config, items, VAE, tokenizer, and EMA text encoder + UNet as a DiffusionModel."""
    from diffmem.models.model import DiffusionModel
    from diffmem.models.tokenizer import build_clip_tokenizer
    from diffmem.zoo.architecture import make_scheduler, make_text_encoder, make_unet, make_vae
    from diffmem.zoo.build import TrainingImages, ZooConfig, corpus_of, latent_scaling_factor

    for name in ("zoo_config.json", "vae.pt", "denoiser.pt"):
        if not (work / name).is_file():
            sys.exit(f"--work-dir {work}: no {name}; expected a zoo build's work folder past its VAE stage")
    cfg = ZooConfig.from_dict(json.loads((work / "zoo_config.json").read_text()))
    items = corpus_of(cfg.corpus).build(cfg.corpus)
    vae = make_vae(cfg.arch)
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["model"])
    # the build sets the scaling factor after training, from the training images: vae.pt does not hold it
    vae.eval().register_to_config(scaling_factor=latent_scaling_factor(
        vae, TrainingImages.for_corpus(corpus_of(cfg.corpus), items).pixels))
    state = torch.load(work / "denoiser.pt", weights_only=False)
    text_encoder, unet = make_text_encoder(cfg.arch), make_unet(cfg.arch)
    unet.load_state_dict({k[5:]: v for k, v in state["ema"].items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[5:]: v for k, v in state["ema"].items() if k.startswith("text.")})
    # the tokenizer's vocabulary files are rebuilt in a scratch folder removed at once (the tokenizer reads them
    # when built): the work folder is only read, and nothing is left behind
    with tempfile.TemporaryDirectory(prefix="probe-tok-") as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch), model_max_length=cfg.arch.max_tokens)
    model = DiffusionModel(unet.eval(), text_encoder.eval(), tokenizer, make_scheduler(), vae.eval(),
                           device=torch.device("cpu"), dtype=torch.float32, source=f"work:{work}", folder=None)
    return cfg, items, model, int(state["step"])


def _load_zoo(folder: Path):
    """A finished zoo folder (``zoo.json`` inside) as the same tuple, step = its recorded denoiser steps."""
    from diffmem.models import load_model
    from diffmem.zoo.build import ZooConfig
    from diffmem.zoo.load import load_corpus

    record = json.loads((folder / "zoo.json").read_text())
    cfg = ZooConfig.from_dict(record["config"])
    return cfg, load_corpus(folder), load_model(str(folder / "pipeline")), cfg.train.unet_steps


def probe(work: Path, seeds: int, ssim_at: float, steps: int, guidance: float = 7.5, reader=None,
          fidelity_captions: int = 60) -> dict:
    """Own-image SSIM of every signature's generations, by duplication rate (``work``: a build's work folder, or a
    finished zoo folder to compare with); with an SD attribute ``reader``, also the named-factor fidelity."""
    from diffmem.eval.similarity import ssim_pairs
    from diffmem.zoo.build import corpus_of
    from diffmem.zoo.load import vae_roundtrip

    started = time.time()
    cfg, items, model, step = _load_zoo(work) if (work / "zoo.json").is_file() else _load_work(work)
    render = corpus_of(cfg.corpus).render
    signatures = [it for it in items if it.kind == "signature"]
    own = torch.from_numpy(np.stack([render(it, 0) for it in signatures])).permute(0, 3, 1, 2).float() / 255
    own = vae_roundtrip(model, own)
    prompts = [it.caption for it in signatures for _ in range(seeds)]
    seed_list = [10_000 + i for i in range(len(prompts))]
    with torch.no_grad():
        gen = model.sample(prompts, seed_list, num_inference_steps=steps, guidance_scale=guidance, batch_size=64,
                           progress=False).images
    sims = ssim_pairs(gen.float(), own.repeat_interleave(seeds, 0)).view(len(signatures), seeds).numpy()
    by_rate = {}
    for rate in sorted({it.replication for it in signatures}):
        rows = np.array([i for i, it in enumerate(signatures) if it.replication == rate])
        best = sims[rows].max(1)
        by_rate[f"{rate}x"] = {"n": int(len(rows)), "median_ssim": round(float(np.median(sims[rows])), 4),
                               "median_best_of_seeds": round(float(np.median(best)), 4),
                               f"share_best_above_{ssim_at}": round(float((best > ssim_at).mean()), 4)}
    entry = {"step": step, "seeds": seeds, "ddim_steps": steps, "guidance": guidance, "by_rate": by_rate}
    if reader is not None:
        entry["named_fidelity"] = named_fidelity_probe(model, items, reader, seeds, steps, guidance, fidelity_captions)
    entry["seconds"] = round(time.time() - started, 1)
    return entry


def named_fidelity_probe(model, items: list, reader, seeds: int, steps: int, guidance: float, n_captions: int
                         ) -> dict:
    """Share of generations of ordinary captions naming one more factor (style, position or size) that show every
    factor their caption names, and each factor's read-back rate: the fidelity gate, on ``n_captions`` evenly
    spaced captions, so a build's position and size can be followed while it trains."""
    from diffmem.zoo.sd_gates import named_fidelity

    extended = [it for it in items if it.kind == "generic" and sum(
        v is not None for v in (it.named.style, it.named.position, it.named.size)) == 1]
    chosen = [extended[round(i * len(extended) / n_captions)] for i in range(min(n_captions, len(extended)))]
    prompts = [it.caption for it in chosen for _ in range(seeds)]
    with torch.no_grad():
        gen = model.sample(prompts, [20_000 + i for i in range(len(prompts))], num_inference_steps=steps,
                           guidance_scale=guidance, batch_size=64, progress=False).images
    scores = named_fidelity(reader, gen, chosen, seeds)  # the fidelity gate's own reading
    return {"captions": len(chosen), **{k: round(v, 4) for k, v in scores.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="a build's work folder, or a finished zoo folder")
    ap.add_argument("--out", type=Path, required=True, help="JSON file; each call appends its step's entry")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ssim", type=float, default=0.8, help="report the share of signatures above this SSIM")
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5, help="CFG scale (the labeller's: 7.5)")
    ap.add_argument("--reader", type=Path, default=None,
                    help="an SD attribute reader folder (e.g. a finished SD zoo's attribute_reader): also measure "
                         "the named-factor fidelity of ordinary captions (default: off)")
    ap.add_argument("--fidelity-captions", type=int, default=60, help="ordinary captions for --reader")
    args = ap.parse_args(argv)
    reader = None
    if args.reader is not None:
        from diffmem.zoo.sd_attributes import SDAttributeReader

        if not (args.reader / "config.json").is_file():
            sys.exit(f"--reader {args.reader}: no config.json; expected an SD attribute reader folder")
        reader = SDAttributeReader.load(args.reader)
    torch.manual_seed(0)
    entry = probe(args.work_dir, args.seeds, args.ssim, args.ddim_steps, args.guidance, reader, args.fidelity_captions)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"work_dir": str(args.work_dir), "probes": []}
    key = (entry["step"], entry["guidance"], entry["ddim_steps"])
    record["probes"] = [p for p in record["probes"]
                        if (p["step"], p.get("guidance", 7.5), p["ddim_steps"]) != key] + [entry]
    atomic_write_text(args.out, portable_json(record))
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
