"""``diffmem finetune`` and its parts on a tiny random SD folder: the image-caption reader, deduplication, the
parameter families against MemControl's definitions, the training-time mitigations against their reference
code's constants, resume, and the written checkpoint."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffmem.errors import DiffmemError
from diffmem.finetune.dataset import FinetuneSet, read_finetune_folder, write_finetune_folder
from diffmem.finetune.dedup import deduplicate, find_duplicates
from diffmem.finetune.families import make_family, transformer_units
from diffmem.finetune.mitigations import CaptionPolicy, NoiseNormFilter, insert_words
from diffmem.finetune.trainer import FinetuneSettings, finetune


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images (blurred noise), so perceptual hashes of different images differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    from diffmem.models import load_model

    return load_model(tiny_sd_folder)


@pytest.fixture(scope="module")
def data() -> FinetuneSet:
    images = _images(6)
    return FinetuneSet(images, [[f"a photo number {i}", f"picture {i}"] for i in range(6)],
                       [f"{i}.png" for i in range(6)], "test")


# ------------------------------------------------------------------ the folder reader
def test_folder_reader_reads_metadata_and_sidecars(tmp_path):
    images = _images(3, 20)
    write_finetune_folder(tmp_path / "meta", images, [["one", "uno"], ["two"], ["three"]])
    got = read_finetune_folder(tmp_path / "meta", 16)
    assert got.captions == [["one", "uno"], ["two"], ["three"]]
    assert tuple(got.images.shape) == (3, 3, 16, 16)
    side = tmp_path / "side"
    side.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(side / "a.png")  # not square: centre-cropped
    (side / "a.txt").write_text("first caption\n\nsecond caption\n")
    got = read_finetune_folder(side, 8)
    assert got.captions == [["first caption", "second caption"]] and tuple(got.images.shape) == (1, 3, 8, 8)


def test_folder_reader_names_bad_input(tmp_path):
    with pytest.raises(DiffmemError, match="does not exist"):
        read_finetune_folder(tmp_path / "nope", 16)
    folder = tmp_path / "nocap"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "x.png")
    with pytest.raises(DiffmemError, match="x.png' has no caption"):
        read_finetune_folder(folder, 8)
    (folder / "metadata.jsonl").write_text('{"file_name": "y.png", "text": "c"}\n')
    with pytest.raises(DiffmemError, match="names 'y.png'"):
        read_finetune_folder(folder, 8)


# ------------------------------------------------------------------ deduplication
def _set(images: torch.Tensor) -> FinetuneSet:
    return FinetuneSet(images, [[f"c{i}"] for i in range(len(images))], [f"{i}.png" for i in range(len(images))], "t")


def test_dedup_finds_exact_and_near_copies_and_keeps_captions():
    base = _images(5, 32, seed=1)
    shifted = torch.roll(base[2:3], shifts=1, dims=-1)  # a one-pixel shift: a near copy
    data = _set(torch.cat([base, base[0:1], shifted]))
    groups, exact, near = find_duplicates(data, "exact")
    assert groups == [[0, 5]] and (exact, near) == (1, 0)
    groups, exact, near = find_duplicates(data, "near")
    assert groups == [[0, 5], [2, 6]] and (exact, near) == (1, 1)
    kept, report = deduplicate(data, "near")
    assert kept.files == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert kept.captions[0] == ["c0", "c5"] and kept.captions[2] == ["c2", "c6"]
    assert report.removed() == 2 and report.describe()["near_duplicates"] == 1
    assert find_duplicates(data, "none") == ([], 0, 0)


def test_dedup_keeps_distinct_images():
    """Different pictures (independent smooth noise) are never merged at the default distance."""
    assert find_duplicates(_set(_images(40, 32, seed=3)), "near")[0] == []


# ------------------------------------------------------------------ caption mitigations (DCR constants)
def test_caption_policy_matches_dcr(clip_tokenizer):
    rng = random.Random(0)
    caps = ["a red apple on a table", "fruit"]
    assert CaptionPolicy("first").caption(caps, clip_tokenizer, rng) == caps[0]
    multi = {CaptionPolicy("multi").caption(caps, clip_tokenizer, rng) for _ in range(50)}
    assert multi == set(caps)  # allcaps: uniform over the list, probability unused
    add = CaptionPolicy("add-tokens", prob=1.0)
    out = add.caption(caps, clip_tokenizer, random.Random(1))
    assert len(out.split(" ")) >= len(caps[0].split(" ")) + 1 and out != caps[0]
    rep = CaptionPolicy("repeat-words", prob=1.0).caption(caps, clip_tokenizer, random.Random(2)).split(" ")
    assert len(rep) == 8 and sorted(set(rep)) == sorted(set(caps[0].split(" ")))  # 2 of its own words added
    replaced = [CaptionPolicy("replace", prob=0.1).caption(caps, clip_tokenizer, random.Random(s)) for s in range(400)]
    share = np.mean([r != caps[0] for r in replaced])
    assert 0.06 < share < 0.14  # DCR's default probability 0.1
    assert insert_words("a b", ["x"], random.Random(0)) in {"x a b", "a x b", "a b x"}


def test_noise_filter_calibrates_a_quantile():
    f = NoiseNormFilter(quantile=0.9)
    assert f.calibrate(np.arange(1, 101, dtype=float)) == pytest.approx(90.1)
    assert f.keep(torch.tensor([90.0, 90.1, 95.0])).tolist() == [True, False, False]  # Wen: >= threshold drops
    assert NoiseNormFilter(threshold=2.0).calibrate(np.ones(5)) == 2.0


# ------------------------------------------------------------------ parameter families (MemControl's)
def _fresh_unet(model):
    import copy

    return copy.deepcopy(model.unet)


def test_attention_family_mask_freezes_only_attention_projections(model):
    unet = _fresh_unet(model)
    units = transformer_units(unet)
    assert units[0].startswith("down_blocks") and units[1].startswith("mid_block")  # MemControl's order
    off = units[0]
    make_family("attention").attach(unet, {off: False})
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert all("attentions" in n for n in trainable)
    assert f"{off}.transformer_blocks.0.attn1.to_q.weight" not in trainable
    assert f"{off}.transformer_blocks.0.ff.net.2.weight" in trainable  # ff trains whatever the mask says
    assert f"{off}.proj_in.weight" in trainable
    assert f"{units[1]}.transformer_blocks.0.attn2.to_k.weight" in trainable


def test_svdiff_recomposes_exactly_at_zero_and_bakes(model):
    unet = _fresh_unet(model)
    before = {n: p.clone() for n, p in unet.state_dict().items()}
    family = make_family("svdiff")
    groups = family.attach(unet, {})
    assert groups[1]["lr"] == 1e-6 and all(d.numel() == 1 for d in groups[1]["params"])  # norm deltas: scalars
    w = unet.conv_in.weight
    assert torch.allclose(w, before["conv_in.weight"], atol=1e-5)
    with torch.no_grad():
        unet.conv_in.parametrizations.weight[0].delta[0] += 0.5
    family.bake(unet)
    after = unet.state_dict()
    assert set(after) == set(before)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["conv_in.weight"]  # untouched layers get their exact weights back
    s_before = torch.linalg.svdvals(before["conv_in.weight"].reshape(len(w), -1))
    s_after = torch.linalg.svdvals(after["conv_in.weight"].reshape(len(w), -1))
    assert float(s_after[0] - s_before[0]) == pytest.approx(0.5, abs=1e-4)


def test_difffit_scales_fold_into_the_weights(model):
    unet = _fresh_unet(model)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10])
    emb = torch.randn(1, 77, 32)
    family = make_family("difffit")
    groups = family.attach(unet, {})
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert any(n.endswith("bias") for n in names) and any("norm" in n for n in names)
    gammas = [p for p in groups[0]["params"] if p.dim() == 1 and torch.all(p == 1)]
    assert len(gammas) >= 7  # per block: attn1, attn2, ff branches + q, k, v, out of each attention
    with torch.no_grad():
        for i, g in enumerate(gammas):
            g.mul_(1 + 0.05 * (i % 5))
        scaled = unet(x, t, encoder_hidden_states=emb).sample
        family.bake(unet)
        baked = unet(x, t, encoder_hidden_states=emb).sample
    assert torch.allclose(scaled, baked, atol=1e-5)
    assert set(unet.state_dict()) == set(model.unet.state_dict())


# ------------------------------------------------------------------ the trainer
def test_finetune_learns_and_resumes_exactly(model, data, tmp_path):
    settings = FinetuneSettings(family="attention", lr=1e-3, steps=6, batch=4, checkpoint_every=3)
    whole = finetune(model, data, settings, work=tmp_path / "a")
    assert whole.trained_parameters < whole.unet_parameters
    assert np.isfinite(whole.losses).all() and len(whole.losses) == 6

    class Killed(Exception):
        pass

    def kill_at_step_5(step, total, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):  # killed after the state of step 3 was saved
        finetune(model, data, settings, work=tmp_path / "b", progress=kill_at_step_5)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 3
    resumed = finetune(model, data, settings, work=tmp_path / "b")
    assert resumed.losses == whole.losses
    a, b = whole.model.unet.state_dict(), resumed.model.unet.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)  # a resumed run equals the uninterrupted one
    other = FinetuneSettings(family="attention", lr=2e-3, steps=6, batch=4, checkpoint_every=3)
    with pytest.raises(DiffmemError, match="another model, data set or settings"):
        finetune(model, data, other, work=tmp_path / "b")
    with pytest.raises(DiffmemError, match="more than the 5 asked"):
        finetune(model, data, replace(settings, steps=5), work=tmp_path / "b")
    # a shorter run extended to the full length equals the full run too
    finetune(model, data, replace(settings, steps=4), work=tmp_path / "c")
    extended = finetune(model, data, settings, work=tmp_path / "c")
    assert extended.losses == whole.losses
    for _, p in model.unet.named_parameters():
        assert not p.requires_grad  # the input model is untouched
    tuned = dict(whole.model.unet.named_parameters())
    changed = [n for n, p in model.unet.named_parameters() if not torch.equal(p, tuned[n])]
    assert changed and all("attentions" in n for n in changed)


def test_noise_filter_drops_the_text_driven_share(model, data):
    f = NoiseNormFilter(quantile=0.5)
    out = finetune(model, data, FinetuneSettings(family="full", lr=1e-4, steps=4, batch=6, noise_filter=f))
    assert out.filter_calibration["threshold"] == pytest.approx(f.threshold)
    assert 0.2 < np.mean(out.kept_share) < 0.8  # about half the base model's norms lie above the median


def test_finetune_command_writes_a_new_checkpoint(tiny_sd_folder, tmp_path):
    from diffmem.cli.main import main
    from diffmem.models import load_model
    from diffmem.models.sources import folder_fingerprint

    folder = write_finetune_folder(tmp_path / "set", torch.cat([_images(4), _images(4)[[0, 0]]]),
                                   [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]])
    before = folder_fingerprint(tiny_sd_folder)
    out = tmp_path / "tuned"
    replay = tmp_path / "replay.txt"
    replay.write_text("a red circle\na blue square\n")
    rc = main(["finetune", "--model", str(tiny_sd_folder), "--data", str(folder), "--out", str(out),
               "--family", "difffit", "--steps", "3", "--batch", "2", "--lr", "1e-3", "--dedup", "exact",
               "--replay", str(replay), "--replay-share", "0.5"])
    assert rc == 0
    assert folder_fingerprint(tiny_sd_folder) == before
    record = json.loads((out / "finetune.json").read_text())
    assert record["dedup"]["images_removed"] == 2  # 3 copies of one image
    assert record["replay"]["images"] == 2 and record["data"]["images"] == 4 + 2  # replay: half of the 4 kept
    assert record["result"]["steps"] == 3 and record["settings"]["family"] == "difffit"
    tuned = load_model(out)
    base = load_model(tiny_sd_folder)
    diff = [n for n, p in tuned.unet.state_dict().items() if not torch.equal(p, base.unet.state_dict()[n])]
    assert diff and set(tuned.unet.state_dict()) == set(base.unet.state_dict())


def test_finetune_search_writes_the_chosen_trial_and_resumes_without_training(tiny_sd_folder, tmp_path,
                                                                                monkeypatch):
    """``--search memcontrol``: every trial recorded, the checkpoint is the chosen trial's, the front is plotted;
    a rerun of a killed search reloads its finished trials from their states instead of training them again."""
    from diffmem.cli import finetune_commands
    from diffmem.cli.main import main
    from diffmem.finetune import trainer
    from diffmem.models import load_model

    folder = write_finetune_folder(tmp_path / "set", torch.cat([_images(4), _images(4)[[0, 0]]]),
                                   [["a"], ["b"], ["c"], ["d"], ["a copy"], ["a copy"]])
    heldout = write_finetune_folder(tmp_path / "heldout", _images(2, seed=5), [["e"], ["f"]])
    out = tmp_path / "tuned"
    args = ["finetune", "--model", str(tiny_sd_folder), "--data", str(folder), "--out", str(out), "--search",
            "memcontrol", "--trials", "2", "--heldout", str(heldout), "--steps", "2", "--batch", "2", "-q"]
    # a kill after the first trial: the state folder keeps trial 0 (the final cleanup never ran)
    real_finetune = trainer.finetune
    calls: list[int] = []

    def killed_after_one_trial(*a, **k):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real_finetune(*a, **k)

    monkeypatch.setattr("diffmem.mitigators.memcontrol.finetune", killed_after_one_trial)
    assert main(args) == 130  # diffmem: interrupted; rerun the same command to resume
    assert (out / finetune_commands.STATE_DIR / "trial000" / trainer.STATE_FILE).is_file()
    steps_trained: list[int] = []
    def counting_steps(*a, **k):
        return real_finetune(*a, **{**k, "progress": lambda step, total, loss: steps_trained.append(step)})

    monkeypatch.setattr("diffmem.mitigators.memcontrol.finetune", counting_steps)
    assert main(args) == 0
    assert steps_trained == [1, 2]  # only trial 1 trained; trial 0 reloaded from its state
    record = json.loads((out / "finetune.json").read_text())
    search = record["search"]
    assert [t["trial"] for t in search["trials"]] == [0, 1] and search["chosen"]["trial"] in search["pareto"]
    assert search["memorization_data"] == "1 near-duplicate group(s) of --data" and search["memorization_images"] == 1
    chosen = search["chosen"]
    assert record["settings"]["family"] == "svdiff" and record["settings"]["lr"] == chosen["learning_rate"]
    assert record["settings"]["mask"] == {u: bool(v) for u, v in chosen["mask"].items()}
    assert (out / finetune_commands.FRONT_PLOT).stat().st_size > 1000
    assert not (out / finetune_commands.STATE_DIR).exists()
    # the written UNet is the chosen trial's: its held-out loss is the one the search recorded
    from diffmem.eval.quality import heldout_denoising_loss

    tuned = load_model(out)
    images = read_finetune_folder(heldout, tuned.latent_shape[-1] * 2 ** (len(tuned.vae.config.block_out_channels) - 1))
    got = float(heldout_denoising_loss(tuned, images.images, images.first_captions(), noise_seed=0).mean())
    assert got == pytest.approx(chosen["quality_loss"], rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING"], "fine-tuning folder '.*MISSING' does not exist"),
    (["--search", "memcontrol"], "--search memcontrol needs --heldout DIR"),
    (["--heldout", "x"], "--heldout is read by the search only"),
    (["--search", "memcontrol", "--heldout", "x", "--mask", "mid_block.attentions.0=0"],
     "--mask with --search: the search chooses the mask"),
    (["--family", "wide"], "--family 'wide': expected one of"),
    (["--mask", "down_blocks.0=2"], "--mask 'down_blocks.0=2': expected UNIT=0 or UNIT=1"),
    (["--mask", "no_such_unit=0"], "--mask names \\['no_such_unit'\\]"),
    (["--noise-filter", "q"], "--noise-filter 'q': expected q=Q"),
    (["--noise-filter", "q=1.5"], "quantile must be in \\(0, 1\\)"),
    (["--captions", "first", "--caption-prob", "2"], "caption probability must be in \\[0, 1\\]"),
])
def test_finetune_bad_input_is_one_line_and_writes_nothing(tiny_sd_folder, tmp_path, capsys, extra, message):
    from diffmem.cli.main import main

    data = write_finetune_folder(tmp_path / "set", _images(2), [["a"], ["b"]])
    args = ["finetune", "--model", str(tiny_sd_folder), "--data", str(data), "--out", str(tmp_path / "out"),
            "--steps", "1", "--batch", "1", "-q"]
    if "--data" in extra:
        args[args.index("--data") + 1] = str(tmp_path / extra[1])
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()
