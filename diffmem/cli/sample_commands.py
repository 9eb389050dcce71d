"""``diffmem sample``: generate images for prompts, optionally through an inference-time mitigation.

What a user runs to *see* a model's output (and what ``mitigate embedding-noise`` & co. change): one PNG
per prompt and seed in ``OUT/images/`` and ``OUT/provenance.json`` (model fingerprint, mitigation,
sampler settings, which file holds which prompt).
"""

from __future__ import annotations

import argparse
import json
import re

from diffmem.cli.options import add_force, add_model_args, handled_by, positive_int

SAMPLE_WRITES = ("images", "provenance.json")


def register(sub: argparse._SubParsersAction) -> None:
    """``diffmem sample``."""
    sample = handled_by(sub.add_parser("sample", help="generate images for prompts, optionally through --mitigation "
                                                      "FILE"), "diffmem.cli.sample_commands:run_sample")
    add_model_args(sample)
    add_sample_args(sample)


def add_sample_args(p: argparse.ArgumentParser) -> None:
    from diffmem.cli.scan_commands import add_mitigation_args

    p.add_argument("--prompts", required=True, help="prompt file: .txt .jsonl .csv .parquet")
    p.add_argument("--caption-column", default=None, help="column holding the prompt (default: found by name)")
    add_mitigation_args(p, "generate through it")
    p.add_argument("--seeds", type=positive_int, default=1, help="images per prompt, seeds 0..N-1 (default: 1)")
    p.add_argument("--steps", type=positive_int, default=25, help="DDIM steps (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per sampler batch (default: 16)")
    p.add_argument("--out", default="runs/sample", help="output folder (default: runs/sample)")
    add_force(p)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def run_sample(args: argparse.Namespace) -> None:
    from diffmem.cli.options import resolve_device
    from diffmem.cli.scan_commands import first_n, prepare_mitigation, with_mitigation
    from diffmem.io import atomic_write_bytes, atomic_write_text
    from diffmem.models.loader import load_model, model_fingerprint
    from diffmem.outputs import check_output_dir, claim_output_dir
    from diffmem.prompts import load_prompts

    device = resolve_device(args.device)
    prompts = first_n(load_prompts(args.prompts, args.caption_column), args.limit)
    check_output_dir(args.out, "sample", [args.model, args.prompts, args.mitigation], args.force,
                     writes=SAMPLE_WRITES)
    mitigation = prepare_mitigation(args, model_fingerprint(args.model, args.config)) if args.mitigation else None
    model = load_model(args.model, device=device, dtype=args.dtype, config=args.config)
    if mitigation is not None:
        model = with_mitigation(model, mitigation, accept_mismatch=args.accept_mitigation_mismatch)
    out = claim_output_dir(args.out, "sample", SAMPLE_WRITES)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(args.seeds)]
    files = []
    import io

    from PIL import Image

    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        images = model.sample([prompts.texts[i] for i, _ in chunk], [s for _, s in chunk],
                              num_inference_steps=args.steps, guidance_scale=args.guidance).images
        for (i, s), img in zip(chunk, images):
            name = f"images/{prompts.ids[i]}-{_slug(prompts.texts[i])}-seed{s}.png"
            buf = io.BytesIO()
            Image.fromarray((img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")).save(buf, "PNG")
            atomic_write_bytes(out / name, buf.getvalue())
            files.append({"id": prompts.ids[i], "text": prompts.texts[i], "seed": s, "file": name})
    record = {"model": model.describe(), "mitigation": None if mitigation is None else mitigation.config(),
              "prompts": {"source": prompts.source, "n": len(prompts)}, "steps": args.steps,
              "guidance": args.guidance, "images": files}
    atomic_write_text(out / "provenance.json", json.dumps(record, indent=2, default=str))
    print(f"{len(files)} image(s) in {out / 'images'}; provenance: {out / 'provenance.json'}")
