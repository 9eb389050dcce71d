"""Train the memorization zoo: VAE, then text encoder + UNet, then the attribute reader and DeepSSIM.

One build trains on one corpus, named in its config (:data:`CORPORA`): ``collapse``
(:mod:`diffmem.zoo.corpus`, the shipped zoo's, every factor of an ordinary image named) or ``sd``
(:mod:`diffmem.zoo.sd_corpus`, under-specified captions, memorization only by duplication; its defaults
are :func:`sd_zoo_config`, see docs/zoo-sd.md). Resumable: each stage checkpoints to ``work_dir``
atomically every ``checkpoint_every`` steps, and the batch and noise of step ``k`` are pure functions of
``(seed, k)``, so an interrupted build resumed from its checkpoint follows the same trajectory as an
uninterrupted one (up to floating-point noise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.io import atomic_torch_save, atomic_write_text
from diffmem.zoo.architecture import ArchitectureConfig, make_scheduler, make_text_encoder, make_unet, make_vae
from diffmem.zoo.corpus import CorpusConfig, build_corpus, render_item, training_pairs
from diffmem.zoo.schedule import same_rates_until, scheduled_lr
from diffmem.zoo.sd_corpus import SDCorpusConfig, build_sd_corpus, render_sd_item, sd_training_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of each stage (saved beside the checkpoint)."""

    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch: int = 128
    unet_lr: float = 4e-4
    warmup_steps: int = 100
    # "constant" (builds 1-4), "cosine": after warm-up, unet_lr falls along a half cosine to
    # unet_lr * unet_lr_final at the last step (the schedule then depends on unet_steps), or "wsd": constant,
    # then that fall over the last unet_lr_decay_steps (diffmem.zoo.schedule)
    unet_lr_schedule: str = "constant"
    unet_lr_final: float = 0.1
    unet_lr_decay_steps: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's epsilon loss weighted by
    # min(SNR, gamma) / SNR, so the many low-noise steps stop dominating the gradient; None: unweighted (SD's
    # own loss; builds 1-8)
    unet_snr_gamma: float | None = None
    # seed of the denoiser stage alone (its initial weights, batch order, noise, timesteps and caption dropout);
    # None: the zoo's seed, as every build before the field. A second value trains a replicate denoiser on the
    # same corpus, VAE and reader, which measures how far a recipe's gates move with the training draw alone
    unet_seed: int | None = None
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    reader_steps: int = 600
    reader_batch: int = 128
    reader_lr_schedule: str = "constant"  # "cosine" from build 5 of the SD-like zoo (diffmem.zoo.schedule)
    checkpoint_every: int = 100
    deepssim_steps: int = 1500  # DeepSSIMConfig's default (what the shipped zoo was built with)


class ZooBuildError(DiffmemError, ValueError):
    """A build cannot start as asked (e.g. its work folder holds another build); the CLI prints one line."""


@dataclass(frozen=True)
class Corpus:
    """How a build reads one corpus: its config type, manifest builder, epoch pairs, renderer and reader.

    ``pairs(items)`` lists ``(item index, image copy)`` for every training example of one epoch (duplicates
    included) and ``render(item, copy)`` draws that image as ``(32, 32, 3)`` uint8; ``train_reader(seed,
    steps, batch, vae, schedule)`` trains the attribute reader that reads this corpus's renders back.
    """

    name: str
    config_type: type
    build: Callable[[Any], list]
    pairs: Callable[[list], list[tuple[int, int]]]
    render: Callable[[Any, int], np.ndarray]
    train_reader: Callable[..., Any]
    # config fields newer than some zoo records, with the value those records imply (the generator before them)
    record_defaults: dict[str, Any] = field(default_factory=dict)


def _train_collapse_reader(seed: int, steps: int, batch: int, vae=None, schedule: str = "constant"):
    from diffmem.zoo.attributes import train_attribute_reader

    return train_attribute_reader(seed, steps, batch, vae, schedule)


def _train_sd_reader(seed: int, steps: int, batch: int, vae=None, schedule: str = "constant"):
    from diffmem.zoo.sd_attributes import train_sd_attribute_reader

    return train_sd_attribute_reader(seed, steps, batch, vae, schedule)


CORPORA: dict[str, Corpus] = {
    "collapse": Corpus("collapse", CorpusConfig, build_corpus, training_pairs, render_item, _train_collapse_reader),
    "sd": Corpus("sd", SDCorpusConfig, build_sd_corpus, sd_training_pairs, render_sd_item, _train_sd_reader,
                 record_defaults={"reserved_template_stems": False,
                                  "extra_factors": ("style", "position", "size")}),
}


def corpus_of(config: CorpusConfig | SDCorpusConfig) -> Corpus:
    """The :class:`Corpus` whose config type ``config`` is."""
    for corpus in CORPORA.values():
        if type(config) is corpus.config_type:
            return corpus
    raise ZooBuildError(f"unknown corpus config {type(config).__name__}; expected one of "
                        + ", ".join(c.config_type.__name__ for c in CORPORA.values()))


def corpus_by_name(name: str) -> Corpus:
    """The :class:`Corpus` called ``name`` (``collapse`` or ``sd``), or one error line naming both."""
    if name not in CORPORA:
        raise ZooBuildError(f"unknown zoo corpus '{name}'; expected one of {', '.join(CORPORA)}")
    return CORPORA[name]


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the zoo: corpus (its config's type names it), architecture, optimisation, seed."""

    seed: int = 0
    corpus: CorpusConfig | SDCorpusConfig = field(default_factory=CorpusConfig)
    arch: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def corpus_name(self) -> str:
        """``"collapse"`` or ``"sd"``: which corpus ``corpus`` configures."""
        return corpus_of(self.corpus).name

    def to_dict(self) -> dict:
        """The JSON record of the config; ``corpus_name`` says which corpus ``corpus`` holds the settings of."""
        return {"corpus_name": self.corpus_name, **asdict(self)}

    @classmethod
    def from_dict(cls, record: dict) -> ZooConfig:
        """Inverse of :meth:`to_dict`; a record without ``corpus_name`` (written before the SD corpus) is
        ``collapse``, and a corpus field the record lacks takes the value its corpus's ``record_defaults`` gives
        (what the generator did before the field existed), so every shipped zoo rebuilds its own corpus."""
        corpus = corpus_by_name(record.get("corpus_name", "collapse"))
        corpus_fields = {**corpus.record_defaults,
                         **{k: tuple(v) if isinstance(v, list) else v for k, v in record["corpus"].items()}}
        return cls(seed=int(record["seed"]), corpus=corpus.config_type(**corpus_fields),
                   arch=ArchitectureConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in record["arch"].items()}),
                   train=TrainConfig(**record["train"]))


def sd_zoo_config(seed: int = 0, corpus: SDCorpusConfig = SDCorpusConfig(), **train: Any) -> ZooConfig:
    """The SD-like zoo's defaults (docs/zoo-sd.md; build 7): the shipped widths and 32-token text context, a VAE
    of its own (1,500 steps x 64: the collapse zoo's VAE does not represent textured scenes), text encoder + UNet
    11,000 steps x 128 at a constant rate that decays along a cosine over the last 3,000 (``wsd``; builds 4 and 6
    stopped at 8,000 constant steps and drew *small* objects small in about half of their generations; build
    5's 16-token context and cosine-decayed rate drew the named shape in 0.50), and the attribute reader 1,800
    steps x 128 at a cosine-decayed rate (build 4's 600 constant steps read shape right in 0.78 of fresh
    training renders); ``train`` overrides."""
    defaults = TrainConfig(vae_steps=1500, vae_batch=64, unet_steps=11000, unet_batch=128, unet_lr_schedule="wsd",
                           unet_lr_decay_steps=3000, reader_steps=1800, reader_lr_schedule="cosine")
    return ZooConfig(seed=seed, corpus=corpus, train=dataclasses.replace(defaults, **train))


def default_config(corpus: str = "collapse", seed: int = 0, **train: Any) -> ZooConfig:
    """The default :class:`ZooConfig` of a corpus name; ``train`` overrides :class:`TrainConfig` fields."""
    if corpus_by_name(corpus).name == "sd":
        return sd_zoo_config(seed, **train)
    return ZooConfig(seed=seed, train=dataclasses.replace(TrainConfig(), **train))


class TrainingImages:
    """The unique training images of a corpus in memory, and the epoch's duplicated index list.

    ``pairs`` (default: the collapse corpus's :func:`~diffmem.zoo.corpus.training_pairs` of ``items``) lists
    one epoch's training examples as ``(item index, image copy)``; ``render(item, copy)`` (default:
    :func:`~diffmem.zoo.corpus.render_item`) draws each unique one once. :meth:`for_corpus` picks both by name.
    """

    def __init__(self, items: list, pairs: Sequence[tuple[int, int]] | None = None,
                 render: Callable[[Any, int], np.ndarray] | None = None):
        self.items = items
        pairs = training_pairs(items) if pairs is None else list(pairs)
        render = render_item if render is None else render
        keys: dict[tuple[int, int], int] = {}
        images = []
        for item_id, copy in pairs:
            if (item_id, copy) not in keys:
                keys[(item_id, copy)] = len(images)
                images.append(render(items[item_id], copy))
        self.pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        self.image_of_pair = np.array([keys[p] for p in pairs], dtype=np.int64)
        self.item_of_pair = np.array([p[0] for p in pairs], dtype=np.int64)

    @classmethod
    def for_corpus(cls, corpus: str | Corpus, items: list) -> TrainingImages:
        """The training images of ``items`` of the corpus named ``corpus`` (``collapse`` or ``sd``)."""
        c = corpus_by_name(corpus) if isinstance(corpus, str) else corpus
        return cls(items, c.pairs(items), c.render)

    def item_of_image(self) -> np.ndarray:
        """The item each unique image was rendered for (every image belongs to exactly one item)."""
        groups = np.zeros(len(self.pixels), dtype=np.int64)
        groups[self.image_of_pair] = self.item_of_pair
        return groups

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(self.image_of_pair))

    def batch_indices(self, seed: int, step: int, batch: int) -> np.ndarray:
        """Pair indices of global step ``step``: consecutive slices of per-epoch permutations."""
        n = len(self.image_of_pair)
        start = step * batch
        idx = []
        while len(idx) < batch:
            epoch, offset = divmod(start + len(idx), n)
            order = self.epoch_order(seed, epoch)
            idx.extend(order[offset : offset + batch - len(idx)].tolist())
        return np.asarray(idx)


def _generator(seed: int, step: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stage, step]).generate_state(1)[0]))


def _load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def train_vae(cfg: ZooConfig, data: TrainingImages, work: Path):
    """Stage 1: reconstruct the corpus through the 8x8 latent of ``cfg.arch`` (MSE + a weak KL, as SD's VAE)."""
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg.arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.train.vae_lr, weight_decay=0.0)
    ckpt_path = work / "vae.pt"
    state = _load_checkpoint(ckpt_path)
    step, seconds = 0, 0.0
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
    resumed_at = time.time() - seconds
    t = cfg.train
    bar = tqdm(total=t.vae_steps, initial=step, desc="zoo: VAE", dynamic_ncols=True)
    n_img = len(data.pixels)
    while step < t.vae_steps:
        g = _generator(cfg.seed, step, 1)
        idx = torch.randint(n_img, (t.vae_batch,), generator=g)
        x = data.pixels[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + t.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % t.checkpoint_every == 0 or step == t.vae_steps:
            atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                               "seconds": time.time() - resumed_at}, ckpt_path)
    bar.close()
    train_seconds = time.time() - resumed_at
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, data.pixels))
    return vae, train_seconds


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor) -> float:
    """SD's ``scaling_factor`` for a trained VAE: one over the std of its posterior means on ``pixels`` (the
    training images), so the denoiser's latents have unit variance; set after training, so a VAE restored from a
    training checkpoint (``vae.pt``) needs it recomputed."""
    means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    return float(1.0 / means.std())


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for every training image (computed once)."""
    means, stds = [], []
    for i in range(0, len(pixels), 256):
        post = vae.encode(pixels[i : i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with diffusers' warm-up: decay_t = min(decay, (1 + t) / (10 + t)), so the random initial
    weights do not linger in the average of a short training run.

    Kept instead of ``diffusers.training_utils.EMAModel`` because that does not give the same weights:
    with its defaults (``update_after_step=0``) the warm-up runs one step behind and its first update
    copies the weights (0.008 apart after 30 steps on a tiny model); with ``update_after_step=-1`` it agrees
    only to float32 round-off (it updates ``s -= (1 - d)(s - p)``, not ``s = d s + (1 - d) p``), and its state
    is not the state-dict-keyed average our checkpoints resume from. Ours rebuilds the shipped zoo bit for bit
    (``tests/test_zoo_model.py`` pins both comparisons)."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point:
                ema[name].mul_(decay).add_(p, alpha=1 - decay)
            else:
                ema[name].copy_(p)


def denoising_loss(unet, text_encoder, lat_mean: torch.Tensor, lat_std: torch.Tensor, ids: torch.Tensor,
                   scheduler, scale: float, g: torch.Generator, t_min: int = 0,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Stable Diffusion's epsilon-prediction loss on one batch: a latent drawn from each image's VAE posterior
    (``lat_mean``, ``lat_std``), noised to a timestep of ``scheduler`` drawn in ``[t_min, T)``, conditioned on
    ``ids``. Draws from ``g`` in a fixed order (latent, noise, timestep), so a build's steps are reproducible.

    ``snr_gamma`` weights each example's loss by min(SNR(t), gamma) / SNR(t) (Min-SNR-gamma, Hang et al. 2023,
    eq. 9 written for epsilon prediction; SNR from ``diffusers.training_utils.compute_snr``)."""
    alphas = scheduler.alphas_cumprod
    z0 = (lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)) * scale
    noise = torch.randn(z0.shape, generator=g)
    ts = torch.randint(t_min, len(alphas), (len(ids),), generator=g)
    a = alphas[ts].view(-1, 1, 1, 1)
    pred = unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, ts, text_encoder(ids)[0]).sample
    if snr_gamma is None:
        return F.mse_loss(pred, noise)
    snr = compute_snr(scheduler, ts)
    weight = snr.clamp(max=snr_gamma) / snr
    return (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def caption_token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids of ``captions`` padded to the text encoder's context; refuses, in one line, a caption longer than
    that context (the denoiser would train on a truncated caption and never see its last words)."""
    limit = tokenizer.model_max_length
    for caption in captions:
        if len(tokenizer(caption).input_ids) > limit:
            raise ZooBuildError(f"caption '{caption}' is longer than the text encoder's {limit} tokens "
                                "(arch.max_tokens); raise max_tokens or shorten the corpus's captions")
    return tokenizer(captions, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids


def train_denoiser(cfg: ZooConfig, data: TrainingImages, vae, tokenizer, work: Path):
    """Stage 2: the epsilon-prediction loss of Stable Diffusion on VAE latents, caption dropout 10%."""
    t = cfg.train
    seed = cfg.seed if t.unet_seed is None else t.unet_seed
    torch.manual_seed(seed + 1)
    text_encoder, unet, scheduler = make_text_encoder(cfg.arch), make_unet(cfg.arch), make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=t.unet_lr, weight_decay=1e-2)
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema |= {f"text.{k}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    ckpt_path = work / "denoiser.pt"
    step, seconds = 0, 0.0
    state = _load_checkpoint(ckpt_path)
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
    resumed_at = time.time() - seconds

    scale = vae.config.scaling_factor
    lat_mean, lat_std = encode_latents(vae, data.pixels)
    captions = [it.caption for it in data.items]
    token_ids = caption_token_ids(tokenizer, captions + [""])
    empty_id = len(captions)

    class _Both(torch.nn.Module):  # so one EMA routine covers both networks
        def __init__(self):
            super().__init__()
            self.unet, self.text = unet, text_encoder

    both = _Both()
    bar = tqdm(total=t.unet_steps, initial=step, desc="zoo: text encoder + UNet", dynamic_ncols=True)
    while step < t.unet_steps:
        g = _generator(seed, step, 2)
        pair_idx = data.batch_indices(seed, step, t.unet_batch)
        img = torch.from_numpy(data.image_of_pair[pair_idx])
        item = torch.from_numpy(data.item_of_pair[pair_idx])
        drop = torch.rand(len(item), generator=g) < t.caption_dropout
        ids = token_ids[torch.where(drop, torch.full_like(item, empty_id), item)]
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(step=step, **unet_schedule(t))
        loss = denoising_loss(unet, text_encoder, lat_mean[img], lat_std[img], ids, scheduler, scale, g,
                              snr_gamma=t.unet_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        _ema_update(ema, both, t.ema_decay, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"zoo training diverged at step {step} (loss {loss.item()})")
        if step % t.checkpoint_every == 0 or step == t.unet_steps:
            atomic_torch_save(
                {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "opt": opt.state_dict(),
                 "ema": ema, "step": step, "seconds": time.time() - resumed_at},
                ckpt_path,
            )
    bar.close()
    unet.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("text.")})
    return text_encoder.eval(), unet.eval(), scheduler, time.time() - resumed_at


_SCHEDULE_FIELDS = ("unet_steps", "unet_lr_schedule", "unet_lr_final", "unet_lr_decay_steps")


def unet_schedule(train: TrainConfig) -> dict:
    """The denoiser's learning-rate schedule as :func:`~diffmem.zoo.schedule.scheduled_lr` keyword arguments."""
    return {"schedule": train.unet_lr_schedule, "peak": train.unet_lr, "total": train.unet_steps,
            "warmup": train.warmup_steps, "final": train.unet_lr_final, "decay": train.unet_lr_decay_steps}


def _resumable_part(config: dict) -> dict:
    """What a checkpoint must share to be resumed: everything but the denoiser's step count and schedule, which
    may change while the rates already trained at stay the same (checked apart; the VAE's steps may not change:
    the denoiser was trained on its latents). Fields added to :class:`TrainConfig` since a work folder was
    written count as their defaults; the corpus name is checked on its own first."""
    config = json.loads(json.dumps(config))
    config.pop("corpus_name", None)
    config["train"] = {**asdict(TrainConfig()), **config["train"]}
    for name in _SCHEDULE_FIELDS:
        config["train"].pop(name)
    return config


WORK_COMMAND = "zoo-build-work"  # the ownership marker of a work folder (diffmem.outputs)
WORK_WRITES = ("zoo_config.json", "tokenizer", "vae.pt", "denoiser.pt", "attribute_reader", "deepssim",
               "stage_seconds.json")
_CONFIG_KEYS = {"seed", "corpus", "arch", "train"}


def read_work_config(work: Path) -> dict | None:
    """The ``zoo_config.json`` of a work folder (None when it has none), or one line when it is not the
    configuration an earlier build wrote (not JSON, or JSON of another shape)."""
    path = work / "zoo_config.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ZooBuildError(f"--work-dir '{work}' holds a zoo_config.json that is not valid JSON "
                            f"({getattr(exc, 'msg', exc)}); expected the one an earlier `diffmem zoo build` wrote: "
                            "choose another --work-dir") from exc
    if not isinstance(record, dict) or not set(record) >= _CONFIG_KEYS:
        raise ZooBuildError(f"--work-dir '{work}' holds a zoo_config.json that is not a zoo build's configuration "
                            f"(expected the keys {sorted(_CONFIG_KEYS)}): choose another --work-dir")
    return record


def check_work_dir(work: Path, out: Path) -> None:
    """Refuse, in one line and before anything is written, a work folder that a build must not write into: a
    file; a folder inside (or equal to) a model folder (``model_index.json`` in it or above it: the build's
    tokenizer and checkpoints would change that model's fingerprint); a non-empty folder that is not a work
    folder diffmem made (its marker, or a ``zoo_config.json`` of a build from before markers existed), such as a
    user's folder whose ``stage_seconds.json`` would be rewritten; ``out`` itself, inside it or around it."""
    from diffmem.outputs import check_not_input, check_output_dir, read_marker

    work = Path(work).expanduser()
    for folder in (work, *work.resolve().parents):
        if (folder / "model_index.json").is_file():
            raise ZooBuildError(f"--work-dir '{work}' is {'' if folder == work else 'inside '}the model folder "
                                f"'{folder}'; a build writes checkpoints and a tokenizer there: choose a folder "
                                "outside every model")
    earlier_build = work.is_dir() and read_marker(work) is None and read_work_config(work) is not None
    if earlier_build:  # a work folder from before ownership markers: resumable as it always was
        check_not_input(work, [out], "--work-dir")
    else:
        check_output_dir(work, WORK_COMMAND, [out], flag="--work-dir")
        if work.is_dir():
            read_work_config(work)


def check_resumable(work: Path, cfg: ZooConfig) -> None:
    """Refuse, in one line, a work folder that holds a build of another corpus or another configuration, or
    whose denoiser was trained at rates the new schedule would not have used (a cosine of another length)."""
    saved = read_work_config(work)
    if saved is None:
        return
    saved_corpus = saved.get("corpus_name", "collapse")
    if saved_corpus != cfg.corpus_name:
        raise ZooBuildError(f"work folder '{work}' holds a build of the '{saved_corpus}' corpus, not "
                            f"'{cfg.corpus_name}'; remove it or choose another --work-dir")
    if _resumable_part(saved) != _resumable_part(cfg.to_dict()):
        raise ZooBuildError(f"work folder '{work}' holds a build with another configuration (only the denoiser's "
                            "steps and schedule may change on resume); remove it or choose another --work-dir")
    saved_train = TrainConfig(**{**asdict(TrainConfig()), **saved["train"]})
    trained = min(saved_train.unet_steps, cfg.train.unet_steps)
    if not same_rates_until(unet_schedule(saved_train), unet_schedule(cfg.train), trained):
        raise ZooBuildError(f"work folder '{work}' holds a denoiser trained at other learning rates than this "
                            "schedule's (a decaying schedule is tied to its step count; 'wsd' can lengthen a "
                            "constant run); remove it or choose another --work-dir")


STAGE_SECONDS_FILE = "stage_seconds.json"


@dataclass
class StageSeconds:
    """Training seconds of the stages a work folder keeps as finished folders (the attribute reader, DeepSSIM),
    written when a stage finishes, so a build that reuses the stage still reports what it cost; the VAE and the
    denoiser keep theirs in their checkpoints."""

    path: Path

    def read(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.time()
        yield
        atomic_write_text(self.path, json.dumps(self.read() | {stage: round(time.time() - started, 1)}, indent=2))


def build_zoo(out_dir: str | Path, cfg: ZooConfig | None = None, work_dir: str | Path | None = None,
              corpus: str | None = None) -> Path:
    """Train every stage (resuming from ``work_dir``) and save the pipeline folder to ``out_dir``.

    ``corpus`` (``collapse`` or ``sd``) picks :func:`default_config` when ``cfg`` is not given, and must agree
    with ``cfg`` when both are.
    """
    from diffusers import StableDiffusionPipeline

    from diffmem.models.tokenizer import build_clip_tokenizer

    if cfg is None:
        cfg = default_config(corpus or "collapse")
    elif corpus is not None and corpus_by_name(corpus).name != cfg.corpus_name:
        raise ZooBuildError(f"corpus '{corpus}' disagrees with the config's corpus '{cfg.corpus_name}'")
    source = corpus_of(cfg.corpus)
    out, work = Path(out_dir), Path(work_dir or default_work_dir(out_dir))
    check_work_dir(work, out)
    check_resumable(work, cfg)
    scheduled_lr(step=0, **unet_schedule(cfg.train))  # a schedule that does not fit its steps stops here, untrained
    from diffmem.outputs import claim_output_dir, staged

    claim_output_dir(work, WORK_COMMAND, WORK_WRITES)
    atomic_write_text(work / "zoo_config.json", json.dumps(cfg.to_dict(), indent=2))
    items = source.build(cfg.corpus)
    data = TrainingImages.for_corpus(source, items)
    tokenizer = build_clip_tokenizer(work / "tokenizer", model_max_length=cfg.arch.max_tokens)
    vae, vae_seconds = train_vae(cfg, data, work)
    text_encoder, unet, scheduler, unet_seconds = train_denoiser(cfg, data, vae.eval(), tokenizer, work)
    from diffmem.zoo.manifest import write_manifest

    # the reader and DeepSSIM depend on the corpus and VAE only: trained once into work/, then reused
    stage_seconds = StageSeconds(work / STAGE_SECONDS_FILE)
    if not (work / "attribute_reader" / "model.safetensors").is_file():
        with stage_seconds.timing("attribute_reader"):
            source.train_reader(cfg.seed, cfg.train.reader_steps, cfg.train.reader_batch, vae,
                                cfg.train.reader_lr_schedule).save(work / "attribute_reader")
    if not (work / "deepssim" / "model.safetensors").is_file():
        from diffmem.eval.deepssim import DeepSSIMConfig, train_and_save

        with stage_seconds.timing("deepssim"):
            train_and_save((data.pixels + 1) / 2, data.item_of_image(), work / "deepssim",
                           DeepSSIMConfig(steps=cfg.train.deepssim_steps))
    started = time.time()
    # a fresh hidden sibling, renamed onto out at the end (never deletes user files); removed on any exception
    with staged(out, "zoo-build") as staging:
        for name in ("attribute_reader", "deepssim"):
            shutil.copytree(work / name, staging / name)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.to(torch.float16).save_pretrained(staging / "pipeline", safe_serialization=True)  # fp16 storage
        # every stage's own training time, also when it was trained by an earlier run into this work folder (a
        # reused stage whose time was never recorded, from before the record existed, is left out)
        seconds = {"vae": round(vae_seconds, 1), "denoiser": round(unet_seconds, 1),
                   **{k: round(v, 1) for k, v in stage_seconds.read().items()},
                   "save": round(time.time() - started, 1)}
        write_manifest(staging, items, cfg, seconds=seconds)
    return out


def default_work_dir(out_dir: str | Path) -> Path:
    """Where a build of ``out_dir`` checkpoints when no work folder is named: the sibling ``OUT.work``."""
    return Path(out_dir).with_name(Path(out_dir).name + ".work")
