"""Reading and re-weighting cross-attention through diffusers' attention-processor interface.

:func:`wrap_cross_attention` swaps the processor of every cross-attention module whose name matches a
pattern for a wrapper (and restores the originals on exit), so the same code reads the zoo and Stable
Diffusion 1.x/2.x UNets. :func:`cross_attention_probs` recomputes a module's attention probabilities
``softmax(q k^T / sqrt(d))`` from its own projections, exactly as the processor does.
:func:`cross_attention_forward_order` lists the modules in the order a forward pass calls them.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from diffmem.errors import DiffmemError


def find_cross_attention(unet: nn.Module, pattern: str) -> dict[str, Attention]:
    """Cross-attention modules (``attn2`` of the transformer blocks) whose name matches ``pattern``."""
    rx = re.compile(pattern)
    found = {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention
             and rx.search(n)}
    if not found:
        raise DiffmemError(f"the model has no cross-attention layers matching {pattern!r}; "
                           "is it a text-conditional UNet with transformer blocks?")
    return found


def cross_attention_probs(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the module for these inputs: ``(B, heads, queries, tokens)``."""
    h = hidden_states if hidden_states.ndim == 3 else hidden_states.flatten(2).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k = attn.head_to_batch_dim(attn.to_q(h)), attn.head_to_batch_dim(attn.to_k(context))
    probs = attn.get_attention_scores(q, k, None)
    return probs.view(len(h), attn.heads, *probs.shape[1:])


def cross_attention_forward_order(unet: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the UNet's cross-attention modules in the order one forward pass calls them.

    ``run`` makes that pass (any input). The order of ``named_modules`` is the order of registration, not
    of execution (diffusers' UNet2DConditionModel registers its up blocks before its mid block), so a
    paper's "n-th cross-attention layer" is found by running the network, not by sorting names. Cached
    per UNet object.
    """
    cached = _FORWARD_ORDER.get(unet)
    if cached is not None:
        return list(cached)
    called: list[str] = []

    def note(name, attn, inner, args, kwargs):
        if name not in called:
            called.append(name)
        return inner(attn, *args, **kwargs)

    with torch.no_grad(), wrap_cross_attention(unet, "", note):
        run()
    _FORWARD_ORDER[unet] = tuple(called)
    return called


_FORWARD_ORDER: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()

Wrapper = Callable[[str, Attention, Callable, tuple, dict], torch.Tensor]


@contextmanager
def wrap_cross_attention(unet: nn.Module, pattern: str, wrapper: Wrapper) -> Iterator[list[str]]:
    """Within the block, each matching module calls ``wrapper(name, attn, original_processor, args, kwargs)``."""
    modules = find_cross_attention(unet, pattern)
    originals = {name: m.processor for name, m in modules.items()}

    class _Wrapped:
        def __init__(self, name: str, inner):
            self.name, self.inner = name, inner

        def __call__(self, attn, *args, **kwargs):
            return wrapper(self.name, attn, self.inner, args, kwargs)

    try:
        for name, m in modules.items():
            m.set_processor(_Wrapped(name, originals[name]))
        yield list(modules)
    finally:
        for name, m in modules.items():
            m.set_processor(originals[name])
