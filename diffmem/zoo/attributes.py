"""The attribute reader: a small CNN that reads shape, colour, position, size and background.

It is the zoo's counterpart of CLIP score: prompt fidelity = the share of generations whose named
attributes the reader reads back. It is trained on fresh renders of the whole single-object grammar,
half of each batch passed through the zoo's VAE (encode, decode): a generation can at best look like
that round trip, so the reader must read attributes at the decoder's sharpness. It never sees a
generation, so it cannot learn a denoiser's mistakes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffmem.zoo.corpus import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, SceneSpec, ZooObject, render
from diffmem.zoo.schedule import scheduled_lr

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
    "background": tuple(BACKGROUNDS),
}


class AttributeReader(nn.Module):
    """Images in [0, 1], ``(N, 3, 32, 32)`` -> logits per attribute.

    ``attributes`` (name -> values, one head each) defaults to ``default_attributes``: the collapse corpus's; a reader
    of another corpus is a subclass that only sets it (:class:`diffmem.zoo.sd_attributes.SDAttributeReader`).
    :meth:`load` rebuilds the heads saved with the weights, so any reader folder loads through this class.
    """

    default_attributes: ClassVar[dict[str, tuple[str, ...]]] = ATTRIBUTES

    def __init__(self, width: int = 32, attributes: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in (attributes or self.default_attributes).items()}
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in self.attributes.items()})
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """The most likely value of each attribute for each image."""
        self.eval()
        out: dict[str, list[str]] = {name: [] for name in self.attributes}
        for i in range(0, len(images), batch_size):
            logits = self(images[i : i + batch_size].float())
            for name, values in self.attributes.items():
                out[name].extend(values[j] for j in logits[name].argmax(1).tolist())
        return out

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"width": self.width, "attributes": self.attributes}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> AttributeReader:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(width=cfg["width"], attributes=cfg.get("attributes"))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def random_generic_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh renders of random single-object captions, with their attribute indices."""
    idx = {name: rng.integers(len(values), size=n) for name, values in ATTRIBUTES.items()}
    images = []
    for i in range(n):
        obj = ZooObject(SHAPES[idx["shape"][i]], ATTRIBUTES["color"][idx["color"][i]],
                        ATTRIBUTES["position"][idx["position"][i]], ATTRIBUTES["size"][idx["size"][i]])
        images.append(render(SceneSpec(ATTRIBUTES["background"][idx["background"][i]], (obj,)),
                             int(rng.integers(2**31))))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, {k: torch.from_numpy(v) for k, v in idx.items()}


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur and noise, so the reader tolerates decoder softness."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(x), 1, 1, 1, generator=g)
    x = mix * blurred + (1 - mix) * x
    return (x + 0.04 * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


Batch = Callable[[np.random.Generator, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def fit_reader(reader_type: type[AttributeReader], sample: Batch, seed: int, steps: int, batch: int,
               vae=None, desc: str = "zoo: attribute reader", schedule: str = "constant") -> AttributeReader:
    """Train a reader of ``reader_type`` on fresh renders from ``sample(rng, n)`` (images in [0, 1] and value
    indices per attribute; a new batch each step, so it cannot overfit), half of each batch through ``vae``.
    ``schedule`` (:func:`diffmem.zoo.schedule.scheduled_lr`): ``constant`` 2e-3 as the shipped readers, or
    ``cosine`` from 2e-3 to 2e-5 after a 5% warm-up."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    g = torch.Generator().manual_seed(seed)
    reader = reader_type()
    opt = torch.optim.AdamW(reader.parameters(), lr=2e-3)
    warmup = 0 if schedule == "constant" else steps // 20
    for step in tqdm(range(steps), desc=desc, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(schedule, 2e-3, step, steps, warmup, 0.01)
        x, y = sample(rng, batch)
        if vae is not None:
            half = batch // 2
            with torch.no_grad():
                x[:half] = ((vae.decode(vae.encode(x[:half] * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
        logits = reader(_degrade(x, g))
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in reader.attributes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return reader.eval()


def train_attribute_reader(seed: int, steps: int, batch: int, vae=None, schedule: str = "constant") -> AttributeReader:
    """Train the collapse corpus's reader on fresh renders of its single-object grammar."""
    return fit_reader(AttributeReader, random_generic_batch, seed, steps, batch, vae, schedule=schedule)


def attribute_accuracy(reader: AttributeReader, images: torch.Tensor, objects: list[ZooObject],
                       backgrounds: list[str]) -> dict[str, np.ndarray]:
    """Per-image correctness of each attribute, and ``all`` = shape, colour and position all right."""
    read = reader.read(images)
    truth = {"shape": [o.shape for o in objects], "color": [o.color for o in objects],
             "position": [o.position for o in objects], "size": [o.size for o in objects],
             "background": backgrounds}
    correct = {k: np.array([a == b for a, b in zip(read[k], truth[k])]) for k in ATTRIBUTES}
    correct["all"] = correct["shape"] & correct["color"] & correct["position"]
    return correct
