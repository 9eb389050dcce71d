"""Training-time memorization mitigations, as their authors run them (constants cited to the reference code).

**Caption mitigations** (Somepalli et al., NeurIPS 2023; code somepago/DCR at 6c03709, ``datasets.py``
L100-126, ``diff_train.py`` L250-262). One decision per sample per access, so a duplicated image meets a
fresh draw each time it is seen:

- ``multi`` (DCR ``allcaps``, L101-102): one of the image's captions, uniformly, every time (the
  probability is not used);
- ``replace`` (``randrepl``, L103-108): with probability ``prob``, the whole caption becomes 4 CLIP token ids
  drawn uniformly from ``[0, 49400)``, decoded;
- ``add-tokens`` (``randwordadd``, L109-116): with probability ``prob``, 2 decoded random token ids inserted
  at uniform word positions (the inference-time ``random-tokens`` mitigator's :func:`insert_random_tokens`);
- ``repeat-words`` (``wordrepeat``, L117-125): with probability ``prob``, 2 words drawn with replacement from
  the caption's own space-split words, each inserted at a uniform position;
- ``prob`` defaults to 0.1 (``--trainspecial_prob``, ``diff_train.py`` L260-262). The modes other than
  ``multi`` start from the image's first caption.

**Embedding noise** (DCR ``diff_train.py`` L636-638): ``lam * randn_like`` added to the text encoder's whole
``(B, 77, D)`` output, every sample and step. The code's default is 0 (off) and it does not state the paper's
lam; diffmem's option is off by default and the value used is recorded.

**Noise-norm filter** (Wen et al., ICLR 2024; code YuxinWenRick/diffusion_memorization at c8fe471,
``train_text_to_image.py`` L1166-1190, ``--hard_threshold`` L578-582): at each step, under no grad, the
UNet is run with the empty prompt on the same noisy latent and timestep; a sample whose
``||pred(x_t, t, c) - pred(x_t, t, "")||_2`` (flattened, raw model output) reaches the threshold is dropped
from the loss, which is averaged over the kept samples (a batch dropped whole takes no optimiser step).
Wen's code uses the constant 2 (its README's run) on SD v1.4's 4x64x64 latents; the norm grows with the
latent's size and with the model, so diffmem calibrates the threshold on the user's data by default: the
``quantile`` of the *base* model's norms over the fine-tuning set at random timesteps (what the model does
before it has seen any duplicate), or takes ``threshold`` as given (Wen's constant, for a faithful run on SD).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.errors import DiffmemError
from diffmem.mitigators.random_tokens import TOKEN_ID_BOUND, insert_random_tokens

CAPTION_MODES = ("first", "multi", "replace", "add-tokens", "repeat-words")
REPLACE_TOKENS = 4  # DCR datasets.py L105: np.random.randint(49400, size=4)
ADDED_WORDS = 2  # DCR datasets.py L110-116 (randwordadd) and L118-125 (wordrepeat): "2 random words"


def insert_words(caption: str, words: list[str], rng: random.Random) -> str:
    """``caption`` with each of ``words`` inserted in turn at a uniform position among its space-split words
    (DCR ``datasets.py`` L154-159: ``list.insert(random.randint(0, len), word)``)."""
    parts = caption.split(" ")
    for word in words:
        parts.insert(rng.randint(0, len(parts)), word)
    return " ".join(parts)


@dataclass
class CaptionPolicy:
    """Which caption a training sample is paired with (see the module docstring)."""

    mode: str = "first"
    prob: float = 0.1  # DCR diff_train.py L260-262 (--trainspecial_prob)

    def __post_init__(self) -> None:
        if self.mode not in CAPTION_MODES:
            raise DiffmemError(f"caption mode must be one of {', '.join(CAPTION_MODES)}; got '{self.mode}'")
        if not 0.0 <= self.prob <= 1.0:
            raise DiffmemError(f"caption probability must be in [0, 1]; got {self.prob}")

    def caption(self, captions: list[str], tokenizer, rng: random.Random) -> str:
        """One training caption for an image with ``captions``; ``rng`` draws every random choice."""
        if self.mode == "multi":
            return captions[rng.randrange(len(captions))]
        first = captions[0]
        if self.mode == "first" or rng.random() > self.prob:  # DCR: np.random.uniform() <= p applies
            return first
        high = min(TOKEN_ID_BOUND, len(tokenizer))
        if self.mode == "replace":
            return tokenizer.decode([rng.randrange(high) for _ in range(REPLACE_TOKENS)])
        if self.mode == "add-tokens":
            return insert_random_tokens(first, tokenizer, ADDED_WORDS, rng)
        words = first.split(" ")
        return insert_words(first, [words[rng.randrange(len(words))] for _ in range(ADDED_WORDS)], rng)


def add_embedding_noise(embeddings: torch.Tensor, lam: float, g: torch.Generator) -> torch.Tensor:
    """``embeddings + lam * N(0, 1)`` over every element (DCR ``diff_train.py`` L638); unchanged at ``lam`` 0."""
    if lam == 0:
        return embeddings
    noise = torch.randn(embeddings.shape, generator=g).to(embeddings.device, embeddings.dtype)
    return embeddings + lam * noise


def text_guidance_norm(pred: torch.Tensor, pred_empty: torch.Tensor) -> torch.Tensor:
    """Per sample ``||pred_c - pred_empty||_2`` over all latent elements (Wen's ``train_text_to_image.py``
    L1185-1188: the flattened difference's 2-norm, no guidance scale, no division by size)."""
    return (pred.detach().float() - pred_empty.float()).flatten(1).norm(dim=1)


@dataclass
class NoiseNormFilter:
    """Wen et al.'s training-time filter (module docstring): ``threshold`` given, or calibrated as the
    ``quantile`` of the base model's norms on the fine-tuning set (``draws`` random timesteps per image)."""

    threshold: float | None = None
    quantile: float = 0.95
    draws: int = 4
    calibration: dict | None = None  # filled by calibrate(): what the threshold came from

    def __post_init__(self) -> None:
        if self.threshold is None and not 0.0 < self.quantile < 1.0:
            raise DiffmemError(f"noise-norm filter quantile must be in (0, 1); got {self.quantile}")
        if self.threshold is not None and self.threshold <= 0:
            raise DiffmemError(f"noise-norm filter threshold must be > 0; got {self.threshold}")

    def calibrate(self, norms: np.ndarray) -> float:
        """Set the threshold from the base model's ``norms`` (one per image and draw) unless one was given."""
        norms = np.asarray(norms, dtype=np.float64)
        summary = {"draws": int(norms.size), "median": float(np.median(norms)), "max": float(norms.max())}
        if self.threshold is None:
            self.threshold = float(np.quantile(norms, self.quantile))
            summary |= {"rule": f"quantile {self.quantile} of the base model's norms on the fine-tuning set"}
        else:
            summary |= {"rule": "given"}
        summary |= {"threshold": self.threshold, "base_share_above": float(np.mean(norms >= self.threshold))}
        self.calibration = summary
        return self.threshold

    def keep(self, norms: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples whose norm stays below the threshold (Wen: ``>= threshold`` is dropped)."""
        if self.threshold is None:
            raise RuntimeError("NoiseNormFilter.keep before calibrate()")
        return norms < self.threshold
