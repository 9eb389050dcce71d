"""Random token insertion (Somepalli et al. 2023): insert ``n_tokens`` random words into the prompt.

Changing the exact text breaks the string a memorized image is keyed to. Words come from a fixed
vocabulary (by default the prompt's own vocabulary is not assumed: ordinary English words), inserted at
random positions seeded by the prompt text, so the result is deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from diffmem.mitigators.base import MITIGATORS, InferenceMitigator, PatchedModel
from diffmem.mitigators.embedding_noise import text_seed
from diffmem.models.model import DiffusionModel

DEFAULT_WORDS = ["photo", "art", "style", "image", "picture", "view", "scene", "drawing", "detail", "color",
                 "light", "shot", "design", "pattern", "graphic", "render"]


def insert_random_words(prompt: str, words: list[str], n: int, seed: int) -> str:
    rng = random.Random(text_seed(prompt, seed))
    tokens = prompt.split()
    for _ in range(n):
        tokens.insert(rng.randint(0, len(tokens)), rng.choice(words))
    return " ".join(tokens)


@MITIGATORS.register("random-tokens", "somepalli-tokens")
@dataclass
class RandomTokens(InferenceMitigator):
    """Insert ``n_tokens`` random words into every prompt before encoding."""

    name = "random-tokens"
    n_tokens: int = 4
    seed: int = 0
    words: list[str] = field(default_factory=lambda: list(DEFAULT_WORDS))

    def apply(self, model: DiffusionModel) -> DiffusionModel:
        mitigator = self
        original = model.encode_prompts

        class ExtraWords(PatchedModel):
            def encode_prompts(self, prompts, batch_size: int = 256, **kwargs):  # kwargs: e.g. warn_truncation
                changed = [p if p == "" else insert_random_words(p, mitigator.words, mitigator.n_tokens,
                                                                 mitigator.seed) for p in prompts]
                return original(changed, batch_size, **kwargs)

        return ExtraWords.of(model)
