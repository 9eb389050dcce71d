"""Random token insertion (Somepalli et al., "Understanding and Mitigating Copying in Diffusion Models",
NeurIPS 2023; code: somepago/DCR), as its authors run it.

For every generation, draw ``n_tokens`` CLIP token ids uniformly from ``[0, 49400)``, decode each with the
model's own tokenizer, and insert each at a uniform position among the prompt's space-separated words:

- token ids: ``tokenizer.decode(list(np.random.randint(49400, size=1)))`` (DCR ``diff_inference.py`` L21;
  the same in YuxinWenRick/diffusion_memorization ``optim_utils.py`` L45);
- insertion: ``sent_list.insert(random.randint(0, len(sent_list)), word)`` on ``sentence.split(' ')``
  (DCR ``datasets.py`` L154-158);
- count: 2 (DCR ``diff_inference.py`` L218, ``--rand_aug_repeats`` default 2; Somepalli et al.'s paper
  also reports 4);
- fresh per generation: the augmentation runs once per generated prompt with the global RNG
  (``diff_inference.py`` L171-175). diffmem seeds each draw from the generation seed (see
  :mod:`diffmem.mitigators.per_generation`), so runs are deterministic and two seeds differ.

Changing the exact text breaks the string a memorized image is keyed to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from diffmem.errors import DiffmemError
from diffmem.mitigators.base import MITIGATORS
from diffmem.mitigators.per_generation import PerGenerationMitigator, draw_seed
from diffmem.models.model import DiffusionModel

TOKEN_ID_BOUND = 49400  # DCR diff_inference.py L21: np.random.randint(49400)


def insert_random_tokens(prompt: str, tokenizer, n: int, rng: random.Random, bound: int = TOKEN_ID_BOUND) -> str:
    """``prompt`` with ``n`` decoded random token ids, each inserted at a uniform word position in turn."""
    words = prompt.split(" ")
    high = min(bound, len(tokenizer))
    for _ in range(n):
        word = tokenizer.decode([rng.randrange(high)])
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


@MITIGATORS.register("random-tokens", "somepalli-tokens")
@dataclass
class RandomTokens(PerGenerationMitigator):
    """Insert ``n_tokens`` random CLIP tokens into every prompt, redrawn for every generation."""

    name = "random-tokens"
    n_tokens: int = 2

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise DiffmemError(f"n_tokens must be >= 1, got {self.n_tokens}")

    def augmented(self, model: DiffusionModel, prompts: list[str], keys: list[str]) -> list[str]:
        """Each prompt with its own draw of random tokens (the empty prompt is left as it is)."""
        return [p if p == "" else insert_random_tokens(p, model.tokenizer, self.n_tokens,
                                                        random.Random(draw_seed(self.seed, k, p)))
                for p, k in zip(prompts, keys)]

    def perturb(self, model: DiffusionModel, prompts: list[str], keys: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.encode_prompts(self.augmented(model, prompts, keys), warn_truncation=False), None
