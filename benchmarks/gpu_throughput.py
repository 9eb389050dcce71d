"""Benchmark: noise-norm scan throughput of an SD1.5-shaped model on one GPU, and the share of its fp16 peak.

Builds a ``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration (860M parameters) and a CLIP
ViT-L/14-shaped text encoder (123M), random weights (the cost of a forward pass does not depend on the
weights; no hub is needed), in fp16 on CUDA, and times the four call patterns of
``benchmarks/scan_throughput.py`` on the same prompts: (a) reference (one prompt per call, its draws
batched, cond + uncond), (b) batched pairs, (c) the scan engine, (d) conditional forwards alone, at 4 draws.
Attention runs through PyTorch SDPA (diffusers' ``AttnProcessor2_0``), the UNet in channels-last memory
format, optionally ``torch.compile``-d (``--compile``).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one UNet call and one text-encoder
call (a multiply-add counts 2), scaled by the rows each pattern pushes through; the achieved rate is divided
by the device's dense fp16 tensor-core peak (``--peak-tflops``, known for H100/H200/A100/L40S/A10/T4/4090).

    .venv/bin/python benchmarks/gpu_throughput.py --prompts 2048 --batch-size 256 --compile
    .venv/bin/python benchmarks/gpu_throughput.py --tiny          # CPU, seconds: keeps the script alive in CI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_throughput import measure  # noqa: E402

from diffmem.provenance import portable_json  # noqa: E402

# dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets
PEAK_TFLOPS = {"H200": 989.5, "H100 SXM": 989.5, "H100 PCIe": 756.0, "H100": 989.5, "A100": 312.0, "L40S": 362.05,
               "A10": 125.0, "T4": 65.0, "RTX 4090": 165.2}

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 norm_num_groups=32)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
              pad_token_id=49407)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, channels_last: bool, compile_unet: bool):
    """A DiffusionModel over random-weight SD1.5-shaped (or tiny) components, SDPA attention."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.models.model import DiffusionModel
    from diffmem.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
    unet.set_attn_processor(AttnProcessor2_0())
    text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L)))
    tokenizer = build_clip_tokenizer(tempfile.mkdtemp(prefix="diffmem-tok-"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    model = DiffusionModel(unet, text, tokenizer, scheduler, device=device, dtype=dtype,
                           source="random SD1.5-shaped" if not tiny else "random tiny")
    model._fingerprint = "random"  # no weights worth hashing
    if channels_last:
        model.unet = model.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        model.unet = torch.compile(model.unet)
    return model


@torch.no_grad()
def count_flops(model, batch: int) -> dict[str, float]:
    """FLOPs of one UNet row and one text-encoder prompt (counted on a batch, divided by it)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = getattr(model.unet, "_orig_mod", model.unet)  # count the eager module, not the compiled wrapper
    x = torch.randn(batch, *model.latent_shape, device=model.device, dtype=model.dtype)
    emb = torch.randn(batch, model.max_tokens, unet.config.cross_attention_dim, device=model.device, dtype=model.dtype)
    t = torch.full((batch,), 981, device=model.device)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=emb)
    unet_flops = counter.get_total_flops() / batch
    ids = model.tokenize(["a photo"] * batch).to(model.device)
    with FlopCounterMode(display=False) as counter:
        model.text_encoder(ids)
    return {"unet_row": unet_flops, "text_prompt": counter.get_total_flops() / batch}


def device_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    for key, peak in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return name, peak
    return name, None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per engine chunk (UNet rows: x draws)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense fp16 peak (TFLOP/s)")
    parser.add_argument("--out", default="benchmarks/results/gpu_throughput.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    build_start = time.perf_counter()
    model = build_model(args.tiny, device, dtype, not args.no_channels_last, args.compile)
    build_s = time.perf_counter() - build_start
    flops = count_flops(model, min(8, args.batch_size))
    from diffmem.zoo.corpus import COLORS, SHAPES

    texts = [f"a photo of a {c} {s} number {i}" for i in range(args.prompts // 32 + 1) for c in COLORS
             for s in SHAPES][: args.prompts]
    results = measure(model, texts, args.draws, args.batch_size, naive=False)
    name, peak = device_peak(device, args.peak_tflops)
    n, d = len(texts), args.draws
    # UNet rows per pattern: (a) 2D per prompt, (b) 2D per prompt, (c) D per prompt + D once, (d) D per prompt
    rows = {"a_reference_per_prompt": 2 * d * n, "b_batched_pairs": 2 * d * n, "c_engine": d * n + d,
            "d_conditional_forwards_only": d * n}
    for key, entry in results.items():
        total = rows[key] * flops["unet_row"] + n * flops["text_prompt"]
        entry["tflop"] = round(total / 1e12, 4)
        entry["achieved_tflops"] = round(total / entry["seconds"] / 1e12, 4)
        entry["prompts_per_hour"] = round(entry["prompts_per_second"] * 3600)
        if peak:
            entry["share_of_fp16_peak"] = round(total / entry["seconds"] / 1e12 / peak, 4)
    command = " ".join(["benchmarks/gpu_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    record = {"benchmark": "gpu_throughput", "command": command,
              "device": name, "dtype": str(dtype).replace("torch.", ""), "config": "tiny" if args.tiny else "sd1.5",
              "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
              "text_encoder_parameters": sum(p.numel() for p in model.text_encoder.parameters()),
              "attention": "sdpa", "channels_last": not args.no_channels_last, "compiled": args.compile,
              "prompts": n, "draws": d, "batch_size": args.batch_size, "peak_tflops": peak,
              "build_seconds": round(build_s, 2), "flops_per_unet_row": flops["unet_row"],
              "flops_per_text_prompt": flops["text_prompt"], "results": results,
              "engine_speedup_over_reference": round(results["a_reference_per_prompt"]["seconds"]
                                                     / results["c_engine"]["seconds"], 2),
              "engine_over_conditional_only": round(results["c_engine"]["seconds"]
                                                    / results["d_conditional_forwards_only"]["seconds"], 3)}
    if device.type == "cuda":
        record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(portable_json(record))
    print(json.dumps({k: {m: v.get(m) for m in ("prompts_per_hour", "achieved_tflops", "share_of_fp16_peak")}
                      for k, v in results.items()}, indent=2))
    return record


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
