"""Finding layers by name pattern and reading their activations at the first denoising step.

Layers are found by regular expressions over ``named_modules()`` (e.g. ``ff\\.net\\.2$``), never by
fixed indices, so the same code reads the zoo and Stable Diffusion 1.x/2.x UNets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from diffmem.errors import DiffmemError
from diffmem.models.model import DiffusionModel


def find_modules(root: nn.Module, pattern: str, kind: type = nn.Linear) -> dict[str, nn.Module]:
    """Modules of type ``kind`` whose qualified name matches ``pattern`` (``re.search``); a layer wrapped by an
    unfused (peft) adapter counts as its base layer's type, so the wrapper, whose output is the layer's
    output, is found under the layer's own name."""
    rx = re.compile(pattern)
    found = {name: m for name, m in root.named_modules()
             if rx.search(name) and (isinstance(m, kind) or isinstance(getattr(m, "base_layer", None), kind))}
    if not found:
        raise DiffmemError(f"the model has no {kind.__name__} layers matching {pattern!r}; "
                           "is it a UNet with cross-attention transformer blocks?")
    return found


@torch.no_grad()
def first_step_activations(model: DiffusionModel, prompts: list[str], modules: dict[str, nn.Module],
                           reduce: Callable[[torch.Tensor], torch.Tensor], use_input: bool, draws: int = 4,
                           seed: int = 0, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per prompt and module: ``reduce(activation)`` on the conditional branch at x_T, mean over draws.

    ``reduce`` maps a ``(draws, tokens, channels)`` activation to ``(channels,)``. Returns
    ``{module name: (len(prompts), channels)}``.
    """
    sampler = model.make_sampler(50)
    t = int(sampler.timesteps[0])
    latents = model.initial_latents([seed + j for j in range(draws)])
    store: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0] if use_input else output
            x = x.float().reshape(-1, draws, *x.shape[1:])  # (prompts, draws, tokens, channels)
            store[name].append(torch.stack([reduce(p) for p in x]))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        for i in range(0, len(prompts), batch_size):
            emb = model.encode_prompts(prompts[i : i + batch_size])
            model.predict_noise(latents.repeat(len(emb), 1, 1, 1), t, emb.repeat_interleave(draws, 0))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in store.items()}


@contextmanager
def zeroed_channels(modules: dict[str, nn.Module], channels: dict[str, torch.Tensor]):
    """Temporarily zero the given output channels of each module (a forward hook; weights untouched)."""
    handles = []
    for name, idx in channels.items():
        if len(idx) == 0:
            continue

        def hook(module, args, output, idx=idx):
            output = output.clone()
            output[..., idx] = 0
            return output

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fuse_adapters(unet: nn.Module) -> bool:
    """Merge any unfused (peft) LoRA adapters into the base weights and drop the wrappers, so a layer's
    weight is the weight the model runs with and ``ff.net.2`` is a plain ``nn.Linear`` again. Returns
    whether there was anything to fuse. Call on a clone: it rewrites the weights in place."""
    if not any("lora_" in name for name, _ in unet.named_modules()):
        return False
    unet.fuse_lora()
    unet.unload_lora()
    return True


@torch.no_grad()
def sampling_column_norms(model: DiffusionModel, prompts: list[str], modules: dict[str, nn.Module], steps: int,
                          seed: int, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                          batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Wanda's activation norm as ConceptPrune reads it, per sampling step and module: ``(steps, channels)``.

    Every prompt is sampled with full classifier-free guidance from the initial latent of ``seed`` (the same
    for every prompt); at each of the first ``steps`` steps, every token row of each module's *input* (both
    CFG halves) is L2-normalised over channels, and the column norm is accumulated over all rows of all
    prompts: ``||X[:, j]||_2 = sqrt(sum_rows x_rj^2)``. Batching does not change it (sums of squares add).
    """
    sums = {name: torch.zeros(steps, m.in_features) for name, m in modules.items()}
    calls = dict.fromkeys(modules, 0)

    def make_hook(name: str):
        def hook(module, args, output):
            if calls[name] < steps:
                rows = torch.nn.functional.normalize(args[0].float().reshape(-1, args[0].shape[-1]), p=2, dim=1)
                sums[name][calls[name]] += rows.pow(2).sum(0).cpu()
            calls[name] += 1
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            calls.update(dict.fromkeys(modules, 0))
            sampler = model.make_sampler(num_inference_steps)
            x = model.initial_latents([seed] * len(chunk)) * sampler.init_noise_sigma
            for _ in model.denoise(model.encode_prompts(chunk), x, sampler, guidance_scale, max_steps=steps):
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}
