"""`diffmem extract --null-prompts`: verdicts at a stated FDR on a user's checkpoint and training folder.

Planted copies: the training folder holds the model's own generations of two prompts, made with the seeds the
replication attack will use, so those two prompts replicate in every generation and nothing else can."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.attacks.replication import prompt_seeds
from diffmem.cli.main import main

COPIED = ["a photo of a cat on a sofa", "a red bicycle by a wall"]
OTHERS = ["a green tree", "a boat at sea", "a tall house", "two dogs running"]
K = 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_sd_folder):
    from diffmem.models import load_model

    root = tmp_path_factory.mktemp("verdicts")
    model = load_model(tiny_sd_folder)
    images = model.sample([p for p in COPIED for _ in range(K)], [s for p in COPIED for s in prompt_seeds(p, 0, K)],
                          num_inference_steps=25, guidance_scale=7.5).images
    train = root / "train"
    train.mkdir()
    for i, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(train / f"copy{i}.png")
    rng = np.random.default_rng(0)
    for i in range(6):  # unrelated training images
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(train / f"other{i}.png")
    (root / "prompts.txt").write_text("\n".join(COPIED + OTHERS) + "\n", encoding="utf-8")
    null = [f"a {c} {o} in the {p}" for c in ("blue", "small", "old") for o in ("chair", "lamp", "car", "cup", "hat")
            for p in ("morning", "rain")]  # 30 never-trained prompts: 120 null generations
    (root / "null.txt").write_text("\n".join(null) + "\n", encoding="utf-8")
    return root


def test_extract_calls_the_planted_copies_and_nothing_else(planted, tiny_sd_folder, capsys):
    out = planted / "out"
    argv = ["extract", "--model", str(tiny_sd_folder), "--prompts", str(planted / "prompts.txt"), "--train-index",
            str(planted / "train"), "--null-prompts", str(planted / "null.txt"), "--option",
            f"replication.generations={K}", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "2 of 6 prompts replicate training images at FDR 0.05" in text
    v = pq.read_table(out / "verdicts.parquet").to_pylist()
    assert [r["replicates"] for r in v] == [True, True, False, False, False, False]
    assert [r["replication_rate"] for r in v[:2]] == [1.0, 1.0] and all(r["q_value"] < 1e-3 for r in v[:2])
    # the prompt file has no own_item column: whose image it is cannot be said
    assert [r["attribution"] for r in v[:2]] == ["unknown", "unknown"]
    assert all(r["matched_items"] == [] for r in v[2:])
    summary = json.loads((out / "verdicts.json").read_text())
    assert summary["nulls"]["all"]["n"] == 120 and summary["count"]["replicating"] == 2
    assert summary["null_prompts"]["n"] == 30
    # a rerun resumes: nothing is regenerated and the verdicts are the same
    assert main(argv) == 0
    assert pq.read_table(out / "verdicts.parquet").to_pylist() == v


def test_too_few_null_generations_are_refused_in_one_line(planted, tiny_sd_folder, capsys, tmp_path):
    null = planted / "few.txt"
    null.write_text("a chair\na lamp\n", encoding="utf-8")
    assert main(["extract", "--model", str(tiny_sd_folder), "--prompts", str(planted / "prompts.txt"),
                 "--train-index", str(planted / "train"), "--null-prompts", str(null), "--option",
                 f"replication.generations={K}", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "2 prompts x 4 generations leave 4 null generations once one prompt is held out, expected at least 99" in err
    assert "at least 26 never-trained prompts" in err
    assert not (tmp_path / "o").exists()  # refused before anything was generated or written


class _FixedImages:
    """A model stand-in whose generations are given images (the attack only calls ``sample``)."""

    def __init__(self, images):
        self.images = images

    def sample(self, prompts, seeds, **_):
        from types import SimpleNamespace

        return SimpleNamespace(images=self.images[: len(prompts)])


def test_the_own_image_is_always_in_the_shortlist():
    """A low-contrast copy of item 3 is nearer a flat grey image in pixel L2, so a 1-candidate SSIM shortlist
    finds only the grey one; the caption's own image must still be scored."""
    import torch

    from diffmem.attacks import AttackContext, TrainingIndex, make_attack
    from diffmem.eval.matching import SSIMMatcher

    g = torch.Generator().manual_seed(0)
    train = torch.rand(10, 3, 32, 32, generator=g)
    train[9] = 0.5
    copy = ((0.5 + 0.25 * (train[3] - 0.5)) * 255).round() / 255  # an 8-bit image, as generations are judged
    index = TrainingIndex(train, np.arange(10), SSIMMatcher(candidates=1).fit(train), threshold=0.5)
    assert index.matcher.match(copy[None]).index.item() == 9  # the shortlist alone misses it
    attack = make_attack("replication", generations=2)
    out = attack.run(_FixedImages(torch.stack([copy, copy, copy, copy])), ["own known", "own unknown"],
                     AttackContext(index=index, own_items=[3, None]))
    own = index.matcher.pairwise(copy[None], train[3][None]).item()
    assert out["gen_similarity"][0] == pytest.approx([own, own], abs=1e-5) and out["gen_item"][0] == [3, 3]
    assert out["gen_similarity"][1][0] < own and out["gen_item"][1] == [9, 9]  # unknown own item: shortlist only
