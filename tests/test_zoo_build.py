"""Zoo training resumes from its checkpoints onto the same trajectory as an uninterrupted run."""

from __future__ import annotations

import dataclasses

import torch

from diffmem.models.tokenizer import build_clip_tokenizer
from diffmem.zoo.architecture import ArchitectureConfig, make_vae
from diffmem.zoo.build import TrainConfig, TrainingImages, ZooConfig, train_denoiser, train_vae
from diffmem.zoo.corpus import CorpusConfig, build_corpus

TINY = ZooConfig(
    corpus=CorpusConfig(n_generic=1152, items_per_rate=2, n_heldout_signature=4, n_template_groups=1,
                        captions_per_template=2, heldout_per_template=1),
    arch=ArchitectureConfig(text_width=32, text_layers=1, text_heads=2, unet_channels=(32, 32, 32), unet_heads=2,
                            vae_channels=(16, 16, 16)),
    train=TrainConfig(vae_steps=2, vae_batch=4, unet_steps=4, unet_batch=8, checkpoint_every=2, warmup_steps=2),
)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_batches_cover_every_duplicate_once_per_epoch():
    data = TrainingImages(build_corpus(TINY.corpus))
    n = len(data.image_of_pair)
    steps = [data.batch_indices(0, s, 8) for s in range(n // 8)]
    seen = torch.tensor([i for b in steps for i in b])
    assert len(set(seen.tolist())) == len(seen)  # no pair twice within the first epoch
    assert (data.batch_indices(0, 3, 8) == steps[3]).all()


def test_interrupted_training_resumes_identically(tmp_path):
    data = TrainingImages(build_corpus(TINY.corpus))
    tokenizer = build_clip_tokenizer(tmp_path / "tok", model_max_length=TINY.arch.max_tokens)
    vae, _ = train_vae(TINY, data, tmp_path / "vae")
    vae.eval()
    assert vae.config.scaling_factor > 0

    text_full, unet_full, _, _ = train_denoiser(TINY, data, vae, tokenizer, tmp_path / "full")
    half = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, unet_steps=2))
    train_denoiser(half, data, vae, tokenizer, tmp_path / "resumed")  # "interrupted" after 2 of 4 steps
    text_res, unet_res, _, _ = train_denoiser(TINY, data, vae, tokenizer, tmp_path / "resumed")
    for a, b in [(unet_full, unet_res), (text_full, text_res)]:
        for (name, x), y in zip(_state(a).items(), _state(b).values()):
            torch.testing.assert_close(x, y, msg=name)
    fresh = make_vae(TINY.arch)
    assert not torch.equal(next(iter(_state(fresh).values())), next(iter(_state(vae).values())))
