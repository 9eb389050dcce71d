"""Building the zoo from a corpus name: the SD-like corpus end to end on a tiny config (a few steps of every
stage), resume and its refusals, the SD attribute reader and named-factor fidelity, and ``zoo:sd`` by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny_sd_zoo import SMOKE, TINY_ARCH, TINY_SD

from diffmem.cli.main import main
from diffmem.errors import ModelLoadError
from diffmem.models.sources import resolve
from diffmem.models.tokenizer import build_clip_tokenizer
from diffmem.zoo.architecture import ArchitectureConfig
from diffmem.zoo.attributes import AttributeReader
from diffmem.zoo.build import (
    TrainingImages,
    ZooBuildError,
    ZooConfig,
    build_zoo,
    caption_token_ids,
    check_resumable,
    default_config,
    sd_zoo_config,
    train_denoiser,
    train_vae,
)
from diffmem.zoo.corpus import CorpusConfig, build_corpus
from diffmem.zoo.gate import corpus_view
from diffmem.zoo.paths import SHIPPED, SHIPPED_SD
from diffmem.zoo.schedule import ScheduleError, same_rates_until, scheduled_lr
from diffmem.zoo.sd_attributes import (
    SD_ATTRIBUTES,
    SDAttributeReader,
    factor_hits,
    factors_shown,
    fidelity,
    fidelity_by_value,
    random_scene_batch,
    scene_truth,
    train_sd_attribute_reader,
)
from diffmem.zoo.sd_corpus import Named, SDCorpusConfig, build_sd_corpus, render_scene, sample_scene


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One smoke build of the SD-like zoo: every stage, a few steps each."""
    root = tmp_path_factory.mktemp("sdzoo")
    out = build_zoo(root / "zoo_sd", SMOKE, root / "work")
    return {"out": out, "work": root / "work", "root": root}


def test_the_shipped_zoo_was_built_with_the_sd_defaults():
    """`diffmem zoo build --corpus sd` trains the recipe of the shipped checkpoint: its recorded configuration
    (zoo.json) is the SD-like corpus's default one."""
    record = json.loads((SHIPPED_SD / "zoo.json").read_text())
    assert ZooConfig.from_dict(record["config"]) == sd_zoo_config()


def test_sd_defaults_follow_the_training_plan():
    cfg = default_config("sd")
    assert cfg == sd_zoo_config()
    assert cfg.corpus_name == "sd" and cfg.corpus == SDCorpusConfig()
    t = cfg.train
    assert (t.vae_steps, t.vae_batch, t.unet_steps, t.unet_batch) == (1500, 64, 11000, 128)
    # build 7: the shipped widths and 32-token context; build 4's 8,000 constant steps, then 3,000 decaying
    assert cfg.arch == ArchitectureConfig() and cfg.arch.max_tokens == 32
    assert (t.unet_lr_schedule, t.unet_lr_decay_steps, t.unet_lr_final) == ("wsd", 3000, 0.1)
    assert (t.reader_steps, t.reader_lr_schedule) == (1800, "cosine")
    collapse = default_config()
    assert collapse.train.unet_lr_schedule == "constant" and collapse.arch.max_tokens == 32
    assert collapse == ZooConfig() and collapse.corpus_name == "collapse"
    assert default_config("sd", seed=3, unet_steps=7).train.unet_steps == 7
    with pytest.raises(ZooBuildError, match="unknown zoo corpus 'laion'; expected one of collapse, sd"):
        default_config("laion")


def test_cosine_schedule_warms_up_then_falls_to_its_floor():
    lr = [scheduled_lr("cosine", 4e-4, k, 1000, 100, 0.1) for k in range(1000)]
    assert lr[0] == pytest.approx(4e-6) and lr[99] == pytest.approx(4e-4)  # linear warm-up, as builds 1-4
    assert lr[-1] == pytest.approx(4e-5)  # the floor at the last step
    assert lr[549] == pytest.approx(4e-4 * (0.1 + 0.9 * 0.5), rel=1e-2)  # half-way down the cosine
    assert all(a >= b for a, b in zip(lr[99:], lr[100:]))
    assert [scheduled_lr("constant", 4e-4, k, 1000, 100, 0.1) for k in (0, 99, 999)] == pytest.approx(
        [4e-6, 4e-4, 4e-4])
    with pytest.raises(ScheduleError, match="schedule 'linear' is not one of: constant, cosine"):
        scheduled_lr("linear", 4e-4, 0, 1000, 100, 0.1)


def test_every_sd_caption_fits_the_text_context(tmp_path):
    """Even a 16-token context (build 5's; the default is 32) holds every caption of the default corpus and any
    title the generator can draw (bounded slot by slot), and a caption that would be truncated stops the build
    in one line."""
    from diffmem.zoo import sd_corpus as g

    cfg = sd_zoo_config()
    assert cfg.arch.max_tokens >= 16
    tokenizer = build_clip_tokenizer(tmp_path / "tok", model_max_length=16)

    def longest(words) -> int:
        return max(len(tokenizer(str(w), add_special_tokens=False).input_ids) for w in words)

    slots = {"painting": [g.ADJECTIVES, g.NOUNS, ["by"], g.FIRST_NAMES, g.LAST_NAMES],
             "poster": [g.ADJECTIVES, g.NOUNS, ["poster,"], g.CITIES, g.YEARS]}
    for family, words in slots.items():
        assert 2 + sum(longest(w) for w in words) <= 16, family
    captions = [it.caption for it in build_sd_corpus(cfg.corpus)]
    ids = caption_token_ids(tokenizer, captions)
    assert ids.shape == (len(captions), 16)
    assert (ids == 49407).any(dim=1).all()  # every row keeps its end token: nothing was cut
    with pytest.raises(ZooBuildError, match="longer than the text encoder's 16 tokens"):
        caption_token_ids(tokenizer, ["a quiet harbor " * 6])


def test_config_json_names_its_corpus_and_round_trips():
    record = json.loads(json.dumps(SMOKE.to_dict()))
    assert record["corpus_name"] == "sd" and record["corpus"]["titles_per_family"] == 40
    assert ZooConfig.from_dict(record) == SMOKE
    old = ZooConfig().to_dict()
    assert old["corpus_name"] == "collapse"
    del old["corpus_name"]  # written before the SD corpus existed: read as collapse
    assert ZooConfig.from_dict(old) == ZooConfig()


def test_training_images_take_pairs_and_renderer():
    """The shared TrainingImages gives the SD corpus exactly the gate's view (an independent construction), and
    the collapse corpus by default the same as by name."""
    items = build_sd_corpus(TINY_SD)
    data = TrainingImages.for_corpus("sd", items)
    view = corpus_view("sd", TINY_SD)
    assert data.pixels.shape == (len(view.images), 3, 32, 32)
    expected = torch.from_numpy(view.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(data.pixels, expected)
    assert np.array_equal(data.image_of_pair, view.pair_image) and np.array_equal(data.item_of_pair, view.pair_item)
    signature = next(it for it in items if it.kind == "signature" and it.replication == 4)
    assert (data.item_of_pair == signature.item_id).sum() == 4  # duplicated 4x, one unique image
    assert (data.item_of_image() == signature.item_id).sum() == 1
    collapse = build_corpus(CorpusConfig(n_generic=1152, items_per_rate=2, n_heldout_signature=4, n_template_groups=1,
                                         captions_per_template=2, heldout_per_template=1))
    a, b = TrainingImages(collapse), TrainingImages.for_corpus("collapse", collapse)
    assert torch.equal(a.pixels, b.pixels) and np.array_equal(a.image_of_pair, b.image_of_pair)


def test_smoke_build_writes_an_sd_zoo(built):
    from diffmem.models.loader import load_model

    out, work = built["out"], built["work"]
    record = json.loads((out / "zoo.json").read_text())
    assert record["corpus"] == "sd" and record["config"]["corpus_name"] == "sd"
    assert json.loads((work / "zoo_config.json").read_text())["corpus_name"] == "sd"
    assert ZooConfig.from_dict(record["config"]) == SMOKE
    items = build_sd_corpus(TINY_SD)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == [it.caption for it in items]
    first = rows[0]
    assert first["kind"] == "generic" and first["family"] == "ordinary" and set(first["named"]) == {"color", "shape"}
    assert torch.load(work / "denoiser.pt", weights_only=True)["step"] == 4
    assert torch.load(work / "vae.pt", weights_only=True)["step"] == 2
    reader = AttributeReader.load(out / "attribute_reader")  # the base class's loader reads the SD heads
    assert set(json.loads((out / "attribute_reader" / "config.json").read_text())["attributes"]) == set(SD_ATTRIBUTES)
    sd_reader = SDAttributeReader.load(out / "attribute_reader")
    assert set(sd_reader.read(torch.rand(2, 3, 32, 32))) == {"shape", "color", "position", "size", "style"}
    assert reader is not None and (out / "deepssim" / "model.safetensors").is_file()
    model = load_model(out / "pipeline")
    assert model.latent_shape[1:] == (8, 8)


def test_build_records_every_stage_time_also_when_a_stage_is_reused(built):
    """zoo.json's stage seconds cover the reader and DeepSSIM; a rebuild from the finished work folder trains
    nothing and still reports each stage's recorded cost (not the seconds of copying it)."""
    first = json.loads((built["out"] / "zoo.json").read_text())["train_seconds_by_stage"]
    assert set(first) == {"vae", "denoiser", "attribute_reader", "deepssim", "save"}
    assert all(v > 0 for k, v in first.items() if k != "save")
    again = build_zoo(built["root"] / "again", SMOKE, built["work"])
    second = json.loads((again / "zoo.json").read_text())["train_seconds_by_stage"]
    assert {k: second[k] for k in ("attribute_reader", "deepssim")} == {k: first[k] for k in ("attribute_reader",
                                                                                               "deepssim")}
    saved = torch.load(built["work"] / "denoiser.pt", weights_only=True)["seconds"]
    assert second["denoiser"] >= round(saved, 1) > 0  # resumed from its checkpoint's seconds, not from zero


def test_resume_continues_at_the_saved_step(tmp_path):
    """An SD denoiser at a constant rate stopped after 2 steps and resumed to 4 equals one trained 4 steps
    straight (a cosine schedule is tied to its step count, so growing the count is refused: tests below)."""
    data = TrainingImages.for_corpus("sd", build_sd_corpus(TINY_SD))
    tokenizer = build_clip_tokenizer(tmp_path / "tok", model_max_length=TINY_ARCH.max_tokens)
    vae, _ = train_vae(SMOKE, data, tmp_path / "vae")
    vae.eval()
    constant = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_lr_schedule="constant"))
    full = train_denoiser(constant, data, vae, tokenizer, tmp_path / "full")[1]
    half = dataclasses.replace(constant, train=dataclasses.replace(constant.train, unet_steps=2))
    train_denoiser(half, data, vae, tokenizer, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "denoiser.pt", weights_only=True)["step"] == 2
    resumed = train_denoiser(constant, data, vae, tokenizer, tmp_path / "resumed")[1]
    assert torch.load(tmp_path / "resumed" / "denoiser.pt", weights_only=True)["step"] == 4
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)


def test_resume_refuses_a_work_folder_of_another_corpus(built, capsys):
    collapse = dataclasses.replace(ZooConfig(), train=SMOKE.train, arch=TINY_ARCH)
    with pytest.raises(ZooBuildError, match="holds a build of the 'sd' corpus, not 'collapse'"):
        build_zoo(built["root"] / "other", collapse, built["work"])
    longer = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_steps=9))
    with pytest.raises(ZooBuildError, match="trained at other learning rates than this schedule's"):
        check_resumable(built["work"], longer)  # its last 2 steps decayed: they are not steps 3-4 of 9
    other_vae = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, vae_steps=3))
    with pytest.raises(ZooBuildError, match="another configuration"):
        check_resumable(built["work"], other_vae)
    code = main(["zoo", "build", "--corpus", "collapse", "--out", str(built["root"] / "cli"), "--work-dir",
                 str(built["work"]), "--no-label"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("diffmem: error: work folder")
    assert "'sd' corpus, not 'collapse'" in err


def test_work_folder_written_before_corpus_names_still_resumes(tmp_path):
    old = ZooConfig().to_dict()
    del old["corpus_name"]
    del old["train"]["deepssim_steps"]  # a field added since: counts as its default
    (tmp_path / "zoo_config.json").write_text(json.dumps(old))
    check_resumable(tmp_path, ZooConfig())
    with pytest.raises(ZooBuildError, match="'collapse' corpus, not 'sd'"):
        check_resumable(tmp_path, sd_zoo_config())


def test_cli_rejects_an_unknown_corpus(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build", "--corpus", "laion", "--out", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("diffmem: error:") and err.count("\n") == 1
    assert "invalid choice: 'laion'" in err


def test_sd_reader_reads_above_chance_after_a_short_run():
    """150 steps of batch 32 (no VAE), scored on fresh renders of the distribution it trains on."""
    reader = train_sd_attribute_reader(0, 150, 32)
    x, y = random_scene_batch(np.random.default_rng(123), 300)
    reads = reader.read(x)
    accuracy = {k: float(np.mean([values.index(r) == t for r, t in zip(reads[k], y[k].tolist())]))
                for k, values in SD_ATTRIBUTES.items()}
    chance = {k: 1 / len(v) for k, v in SD_ATTRIBUTES.items()}
    assert accuracy["position"] >= 0.5, accuracy  # chance 0.2
    assert accuracy["color"] >= chance["color"] + 0.05, accuracy  # chance 0.125
    assert np.mean([accuracy[k] - chance[k] for k in SD_ATTRIBUTES]) >= 0.1, accuracy


class TruthReader:
    """A hand-made reader that reads every scene exactly (what a perfect reader would say)."""

    def __init__(self, scenes):
        self.truth = [scene_truth(s) for s in scenes]

    def read(self, images):
        assert len(images) == len(self.truth)
        return {k: [t[k] for t in self.truth] for k in SD_ATTRIBUTES}


def test_named_factor_check_accepts_the_caption_and_rejects_another_colour():
    named = Named(color="red", shape="circle")
    scenes = [sample_scene(named, 7), sample_scene(Named(color="blue", shape="circle"), 7),
              sample_scene(Named(color="red", shape="square"), 8), sample_scene(named, 9)]
    reads = TruthReader(scenes).read(np.stack([render_scene(s) for s in scenes]))
    assert factors_shown(reads, named).tolist() == [True, False, False, True]
    hits = factor_hits(reads, named)
    assert hits["color"].tolist() == [1.0, 0.0, 1.0, 1.0] and hits["shape"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert np.isnan(hits["position"]).all() and np.isnan(hits["style"]).all()  # unnamed: free
    assert factors_shown(reads, Named()).all()  # a caption naming nothing accepts anything
    # one Named per image: each render checked against its own caption
    per_image = [named, Named(color="blue", shape="circle"), Named(color="red", shape="square"), Named(style="poster")]
    expected_style = scenes[3].style == "poster"
    assert factors_shown(reads, per_image).tolist() == [True, True, True, expected_style]
    images = torch.zeros(4, 3, 32, 32)
    assert fidelity(TruthReader(scenes), images, named) == {"all": 0.5, "color": 0.75, "shape": 0.75}
    with pytest.raises(ValueError, match="3 Named for 4 images"):
        factors_shown(reads, per_image[:3])


def test_fidelity_by_value_says_which_named_value_is_drawn_wrong():
    """Captions naming "small" whose objects read "large" lower small's read-back only; unnamed values are left
    out, and each value counts the images whose caption names it."""
    small, large = Named(color="red", shape="circle", size="small"), Named(color="red", shape="circle", size="large")
    scenes = [sample_scene(large, 1), sample_scene(large, 2), sample_scene(large, 3), sample_scene(small, 4)]
    named = [small, small, large, small]  # two "small" captions drew a large object
    by_value = fidelity_by_value(TruthReader(scenes), torch.zeros(4, 3, 32, 32), named)
    assert by_value["size"] == {"large": {"n": 1, "read_back": 1.0}, "small": {"n": 3, "read_back": 1 / 3}}
    assert by_value["color"] == {"red": {"n": 4, "read_back": 1.0}}
    assert "style" not in by_value and "position" not in by_value


def test_zoo_sd_by_name(monkeypatch, tmp_path, built, capsys):
    monkeypatch.delenv("DIFFMEM_ZOO", raising=False)
    from diffmem.zoo.paths import zoo_dir

    monkeypatch.delenv("DIFFMEM_ZOO_SD", raising=False)
    assert resolve(None).folder == resolve("zoo:sd").folder == zoo_dir("sd") / "pipeline"  # the default zoo
    assert resolve("zoo:collapse").folder == SHIPPED / "pipeline"
    monkeypatch.setenv("DIFFMEM_ZOO_SD", str(tmp_path / "absent"))
    with pytest.raises(ModelLoadError) as exc:
        resolve("zoo:sd")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("zoo:sd is not built")
    assert f"diffmem zoo build --corpus sd --out {tmp_path / 'absent'}" in message
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = main(["sample", "--model", "zoo:sd", "--prompts", str(prompts), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("diffmem: error: zoo:sd is not built")
    monkeypatch.setenv("DIFFMEM_ZOO_SD", str(built["out"]))
    assert resolve("zoo:sd").folder == built["out"] / "pipeline"


def test_wsd_schedule_holds_the_peak_then_decays_over_its_last_steps():
    lr = [scheduled_lr("wsd", 4e-4, k, 1000, 100, 0.1, decay=300) for k in range(1000)]
    assert lr[99] == lr[699] == pytest.approx(4e-4)  # stable until the decay starts at step 700
    assert lr[849] == pytest.approx(4e-4 * (0.1 + 0.9 * 0.5), rel=1e-2) and lr[-1] == pytest.approx(4e-5)
    with pytest.raises(ScheduleError, match="wsd decay of 0 steps does not fit 1000 steps"):
        scheduled_lr("wsd", 4e-4, 0, 1000, 100, 0.1, decay=0)
    # a constant run of 700 steps and a wsd run of 1000 (decay 300, its first decay step still at the peak) agree
    # on every step the first one trained, and part at the second decay step
    constant = {"schedule": "constant", "peak": 4e-4, "total": 700, "warmup": 100, "final": 0.1, "decay": 0}
    wsd = {**constant, "schedule": "wsd", "total": 1000, "decay": 300}
    assert same_rates_until(constant, wsd, 700) and not same_rates_until(constant, wsd, 702)
    cosine = {**constant, "schedule": "cosine"}
    assert not same_rates_until(cosine, {**cosine, "total": 1000}, 200)  # a cosine is tied to its length


def test_a_constant_work_folder_resumes_into_a_wsd_schedule_only(tmp_path):
    """Lengthening a constant run with a decay at the end resumes; a decay starting before the saved step, or
    any other change, is refused."""
    saved = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_lr_schedule="constant",
                                                                 unet_steps=8, warmup_steps=2))
    (tmp_path / "zoo_config.json").write_text(json.dumps(saved.to_dict()))

    def train(**changes):
        return dataclasses.replace(saved, train=dataclasses.replace(saved.train, **changes))

    check_resumable(tmp_path, train(unet_lr_schedule="wsd", unet_steps=12, unet_lr_decay_steps=4))
    check_resumable(tmp_path, train(unet_steps=20))  # constant, longer
    with pytest.raises(ZooBuildError, match="trained at other learning rates"):
        check_resumable(tmp_path, train(unet_lr_schedule="wsd", unet_steps=12, unet_lr_decay_steps=6))
    cosine = train(unet_lr_schedule="cosine")
    (tmp_path / "zoo_config.json").write_text(json.dumps(cosine.to_dict()))
    with pytest.raises(ZooBuildError, match="trained at other learning rates"):
        check_resumable(tmp_path, train(unet_lr_schedule="cosine", unet_steps=12))  # 8 steps are not 12's first 8
    (tmp_path / "zoo_config.json").write_text(json.dumps(saved.to_dict()))
    with pytest.raises(ZooBuildError, match="only the denoiser's steps and schedule may change"):
        check_resumable(tmp_path, train(unet_lr_schedule="wsd", unet_steps=12, unet_lr_decay_steps=4,
                                        unet_lr=1e-4))


def test_cli_refuses_a_decay_longer_than_the_run_before_training(tmp_path, capsys):
    """The SD defaults decay over the last 3,000 steps: asking for 500 steps stops in one line, nothing written."""
    code = main(["zoo", "build", "--corpus", "sd", "--unet-steps", "500", "--out", str(tmp_path / "z"),
                 "--work-dir", str(tmp_path / "w"), "--no-label"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "wsd decay of 3000 steps does not fit 500 steps" in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "z").exists()


class _ZeroUNet(torch.nn.Module):
    """Predicts zero noise, so an example's loss is the mean square of the noise it drew."""

    def forward(self, x, t, context):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def _zero_context(ids):
    return (torch.zeros(len(ids), 4, 8),)


def test_min_snr_weights_each_example_by_min_snr_gamma_over_snr():
    """Unweighted, the loss is SD's plain MSE; with gamma each example's MSE is weighted by min(SNR, gamma) / SNR
    at the timestep it drew (alphabar / (1 - alphabar)), recomputed here from the same draws in the documented
    order (latent, noise, timestep)."""
    from diffmem.zoo.architecture import make_scheduler
    from diffmem.zoo.build import denoising_loss

    scheduler, n = make_scheduler(), 64
    mean, std, ids = torch.randn(n, 4, 2, 2), torch.full((n, 4, 2, 2), 0.1), torch.zeros(n, dtype=torch.long)

    def loss(gamma, t_min=0):
        return denoising_loss(_ZeroUNet(), _zero_context, mean, std, ids, scheduler, 1.0,
                              torch.Generator().manual_seed(3), t_min=t_min, snr_gamma=gamma)

    g = torch.Generator().manual_seed(3)
    torch.randn(mean.shape, generator=g)
    noise = torch.randn(mean.shape, generator=g)
    ts = torch.randint(0, len(scheduler.alphas_cumprod), (n,), generator=g)
    per_example = noise.pow(2).mean(dim=(1, 2, 3))
    abar = scheduler.alphas_cumprod[ts]
    snr = abar / (1 - abar)
    assert loss(None).item() == pytest.approx(per_example.mean().item(), rel=1e-6)
    assert loss(5.0).item() == pytest.approx((per_example * snr.clamp(max=5.0) / snr).mean().item(), rel=1e-5)
    assert loss(5.0).item() < loss(None).item()  # low-noise examples (SNR > 5) drew weights below 1
    # from t = 500 on every SNR is below 1: gamma 5 weights every example by 1
    assert loss(5.0, t_min=500).item() == pytest.approx(loss(None, t_min=500).item(), rel=1e-6)


def test_snr_gamma_is_part_of_the_resumed_configuration(tmp_path):
    """A work folder trained without the weighting is not resumed with it, and one from before the field existed
    counts as unweighted."""
    unweighted = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_snr_gamma=None))
    saved = unweighted.to_dict()
    saved["train"].pop("unet_snr_gamma")
    (tmp_path / "zoo_config.json").write_text(json.dumps(saved))
    check_resumable(tmp_path, unweighted)
    with pytest.raises(ZooBuildError, match="only the denoiser's steps and schedule may change"):
        check_resumable(tmp_path, dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train,
                                                                                       unet_snr_gamma=5.0)))


def test_unet_seed_draws_a_replicate_denoiser_and_is_part_of_the_resumed_configuration(tmp_path):
    """``unet_seed`` equal to the zoo's seed trains exactly the default denoiser (builds before the field are
    unchanged); another value trains a different one on the same data; a work folder of one is not resumed
    as the other."""
    data = TrainingImages.for_corpus("sd", build_sd_corpus(TINY_SD))
    tokenizer = build_clip_tokenizer(tmp_path / "tok", model_max_length=TINY_ARCH.max_tokens)
    vae, _ = train_vae(SMOKE, data, tmp_path / "vae")
    vae.eval()
    short = dataclasses.replace(SMOKE.train, unet_steps=3, unet_lr_schedule="constant")

    def trained(unet_seed: int | None, name: str) -> dict[str, torch.Tensor]:
        cfg = dataclasses.replace(SMOKE, train=dataclasses.replace(short, unet_seed=unet_seed))
        return train_denoiser(cfg, data, vae, tokenizer, tmp_path / name)[1].state_dict()

    default, same, other = trained(None, "default"), trained(SMOKE.seed, "same"), trained(SMOKE.seed + 1, "other")
    for name, weight in default.items():
        torch.testing.assert_close(same[name], weight, rtol=0, atol=0, msg=name)
    assert max((other[name] - weight).abs().max().item() for name, weight in default.items()) > 1e-3
    saved = SMOKE.to_dict()
    saved["train"].pop("unet_seed")  # written before the field existed
    (tmp_path / "zoo_config.json").write_text(json.dumps(saved))
    check_resumable(tmp_path, dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_seed=None)))
    with pytest.raises(ZooBuildError, match="only the denoiser's steps and schedule may change"):
        check_resumable(tmp_path, dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_seed=1)))
