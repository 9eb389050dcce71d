"""Projecting a zoo build's time from two short probe builds (diffmem/zoo/estimate.py)."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_sd_zoo import SMOKE

from diffmem.cli.main import main
from diffmem.zoo.build import ZooBuildError
from diffmem.zoo.estimate import estimate_build, fit_stages, probe_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_each_stage_is_the_line_through_its_two_probe_times():
    """vae: 10 s at 5 steps, 50 s at 25 -> 2 s a step, 0 fixed; the denoiser's 7 s of setup stays fixed."""
    train = dataclasses.replace(SMOKE.train, vae_steps=1500, unet_steps=6000, reader_steps=1800, deepssim_steps=1500)
    small = {"vae": 10.0, "denoiser": 12.0, "attribute_reader": 3.0, "deepssim": 1.0, "save": 0.5}
    large = {"vae": 50.0, "denoiser": 32.0, "attribute_reader": 3.0, "deepssim": 5.0, "save": 0.5}
    by_stage = {s.stage: s for s in fit_stages(train, 5, 25, (small, large))}
    assert by_stage["vae"].seconds_per_step == pytest.approx(2.0)
    assert by_stage["vae"].projected_seconds == pytest.approx(3000.0)
    assert by_stage["denoiser"].seconds_per_step == pytest.approx(1.0)
    assert by_stage["denoiser"].fixed_seconds == pytest.approx(7.0)
    assert by_stage["denoiser"].projected_seconds == pytest.approx(6007.0)
    assert by_stage["attribute_reader"].projected_seconds == pytest.approx(3.0)  # no slope: all fixed
    assert by_stage["deepssim"].projected_seconds == pytest.approx(1500 * 0.2)
    with pytest.raises(ZooBuildError, match="no time for stage 'deepssim'"):
        fit_stages(train, 5, 25, (small, {k: v for k, v in large.items() if k != "deepssim"}))
    with pytest.raises(ValueError, match="0 < small < large"):
        fit_stages(train, 25, 5, (small, large))


def test_a_probe_keeps_the_recipe_but_its_steps_and_schedule():
    """Widths, batches, corpus and seeds stay; every stage's steps become the probe's; a wsd decay longer than
    the probe cannot stop it."""
    cfg = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_steps=6000, unet_lr_decay_steps=2500))
    probe = probe_config(cfg, 3)
    assert (probe.train.vae_steps, probe.train.unet_steps, probe.train.reader_steps, probe.train.deepssim_steps) \
        == (3, 3, 3, 3)
    assert (probe.train.unet_lr_schedule, probe.train.unet_lr_decay_steps) == ("constant", 0)
    assert (probe.arch, probe.corpus, probe.seed, probe.train.unet_batch) == (cfg.arch, cfg.corpus, cfg.seed, 8)


def test_estimate_runs_two_real_probe_builds_and_leaves_nothing(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = dataclasses.replace(SMOKE, train=dataclasses.replace(SMOKE.train, unet_steps=400))
    record = estimate_build(cfg, probe_steps=(1, 3), scratch=scratch)
    assert list(scratch.iterdir()) == []  # the probes' folders are gone
    den = record["stages"]["denoiser"]
    small, large = den["probe_seconds"]
    assert den["steps"] == 400
    assert den["seconds_per_step"] == pytest.approx(max(0.0, (large - small) / 2), abs=1e-3)  # the probes' slope
    assert den["projected_seconds"] == pytest.approx(max(0.0, den["fixed_seconds"]) + 400 * den["seconds_per_step"],
                                                     abs=0.2)
    parts = sum(s["projected_seconds"] for s in record["stages"].values())
    assert record["projected_seconds"] == pytest.approx(parts + record["other_seconds"] + record["save_seconds"],
                                                        abs=0.5)
    assert record["probe_steps"] == [1, 3] and record["corpus"] == "sd"


def test_cli_refuses_a_probe_pair_that_is_not_increasing_or_a_file_it_did_not_write(capsys, tmp_path):
    assert main(["zoo", "estimate", "--corpus", "sd", "--probe-steps", "5", "5"]) == 2
    assert "--probe-steps: expected SMALL < LARGE; got 5 5" in capsys.readouterr().err
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    assert main(["zoo", "estimate", "--corpus", "sd", "--out", str(mine)]) == 2
    assert "is an existing file diffmem did not write" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}'


def test_every_recipe_flag_overrides_the_train_field_it_names():
    """zoo build and zoo estimate read one ZooConfig from the same flags; unset flags keep the corpus defaults."""
    from diffmem.cli.main import build_parser
    from diffmem.cli.zoo_commands import recipe_config
    from diffmem.zoo.build import sd_zoo_config

    args = build_parser().parse_args(
        ["zoo", "estimate", "--unet-steps", "6000", "--unet-lr", "8e-4", "--unet-snr-gamma", "5", "--unet-seed", "1",
         "--vae-steps", "7", "--reader-steps", "9", "--unet-lr-decay-steps", "2500", "--seed", "3"])
    t = recipe_config(args).train
    assert (t.unet_steps, t.unet_lr, t.unet_snr_gamma, t.unet_seed, t.vae_steps, t.reader_steps,
            t.unet_lr_decay_steps) == (6000, 8e-4, 5.0, 1, 7, 9, 2500)
    assert recipe_config(args).seed == 3
    assert recipe_config(build_parser().parse_args(["zoo", "build", "--out", "x"])) == sd_zoo_config()
