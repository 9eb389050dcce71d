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
    """Modules of type ``kind`` whose qualified name matches ``pattern`` (``re.search``)."""
    rx = re.compile(pattern)
    found = {name: m for name, m in root.named_modules() if rx.search(name) and isinstance(m, kind)}
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
