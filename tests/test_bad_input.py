"""Bad input gets one clear line naming the input and what was expected."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from diffmem.cli.main import main
from diffmem.errors import ModelLoadError, NonFiniteError, PromptError
from diffmem.models import load_model


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model folder '.*nope' does not exist"):
        load_model(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file; expected a diffusers pipeline folder"):
        load_model(f)


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder: no model_index.json"):
        load_model(tmp_path)


def test_malformed_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json' is not valid JSON"):
        load_model(tmp_path)


def test_missing_component(tmp_path, tiny_sd_folder):
    copy = tmp_path / "pipe"
    shutil.copytree(tiny_sd_folder, copy)
    shutil.rmtree(copy / "unet")
    with pytest.raises(ModelLoadError, match=r"component folder '.*unet' named in model_index.json is missing"):
        load_model(copy)


def test_corrupt_weights_file(tmp_path, tiny_sd_folder):
    copy = tmp_path / "pipe"
    shutil.copytree(tiny_sd_folder, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot load unet from '.*unet'"):
        load_model(copy)


def test_input_folder_is_never_modified(tiny_sd_folder):
    before = {p: p.read_bytes() for p in tiny_sd_folder.rglob("*") if p.is_file()}
    model = load_model(tiny_sd_folder)
    model.sample(["a cat"], [0], num_inference_steps=2)
    after = {p: p.read_bytes() for p in tiny_sd_folder.rglob("*") if p.is_file()}
    assert before == after


def test_empty_prompt_list(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    with pytest.raises(PromptError, match="empty prompt list"):
        model.encode_prompts([])
    with pytest.raises(PromptError, match="not a single string"):
        model.encode_prompts("a cat")


def test_overlong_prompt_is_truncated_with_a_warning(tiny_sd_folder, caplog):
    model = load_model(tiny_sd_folder)
    long_prompt = " ".join(["red"] * 100)
    with caplog.at_level(logging.WARNING):
        emb = model.encode_prompts([long_prompt])
    assert emb.shape[1] == 77
    assert "prompt #0" in caplog.text and "truncated to the tokenizer's 77" in caplog.text


def test_nan_in_model_output_is_reported(tiny_sd_folder):
    model = load_model(tiny_sd_folder)
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        model.sample(["a cat"], [0], num_inference_steps=2)


def test_bad_dtype_names_the_allowed_values(tiny_sd_folder):
    with pytest.raises(ValueError, match="dtype 'float8' is not supported"):
        load_model(tiny_sd_folder, dtype="float8")


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    code = main(["demo", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("diffmem: error: model folder") and err.count("\n") == 1


# ---------------------------------------------------------------- issue #15: one clear line, nothing written
def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("diffmem: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture()
def prompts_txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a photo of a cat\na dog\na red house\n", encoding="utf-8")
    return path


def test_model_index_naming_another_library_is_refused_before_import(tmp_path, tiny_sd_folder):
    import json

    copy = tmp_path / "pipe"
    shutil.copytree(tiny_sd_folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"component unet names library 'os' in model_index.json; only "
                                             r"diffusers and transformers"):
        load_model(copy)
    index["unet"] = ["diffusers", "logging"]  # a module attribute that is not a model class
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="is not a model class"):
        load_model(copy)


@pytest.mark.parametrize("flag,value,words", [
    ("--batch-size", "0", ["--batch-size", ">= 1, got 0"]),
    ("--batch-size", "-4", ["--batch-size", ">= 1, got -4"]),
    ("--draws", "0", ["--draws", ">= 1, got 0"]),
    ("--dtype", "float64", ["--dtype", "'float64'", "float32"]),
    ("--fpr", "0", ["--fpr", "0 < value < 1"]),
    ("--fpr", "1.5", ["--fpr", "0 < value < 1"]),
    ("--limit", "0", ["--limit"]),
])
def test_bad_numbers_are_one_line(flag, value, words, tmp_path, capsys, prompts_txt):
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--prompts", str(prompts_txt), flag, value, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    _one_line_error(capsys, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device,words", [("gpu", ["'gpu' is not a device name", "cuda:N"]),
                                          ("cuda:x", ["not a device name"])])
def test_unknown_device_is_refused_everywhere(device, words, tmp_path, capsys, prompts_txt, tiny_sd_folder):
    for argv in (["scan", "--prompts", str(prompts_txt)], ["extract", "--prompts", str(prompts_txt)],
                 ["mitigate", "embedding-noise", "--prompts", str(prompts_txt)], ["demo"], ["bench"]):
        assert main([*argv, "--model", str(tiny_sd_folder), "--device", device, "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_not_silently_cpu(tmp_path, capsys, prompts_txt, tiny_sd_folder):
    for argv in (["scan", "--prompts", str(prompts_txt)], ["mitigate", "embedding-noise"]):
        assert main([*argv, "--model", str(tiny_sd_folder), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, "no CUDA GPU is available")


def test_cuda_index_is_honoured(monkeypatch):
    from diffmem.cli.options import resolve_device
    from diffmem.errors import DiffmemError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    with pytest.raises(DiffmemError, match=r"2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_bad_prompt_files_are_one_line(tmp_path, capsys, tiny_sd_folder):
    strings = tmp_path / "plain.jsonl"
    strings.write_text('"a cat"\n"a dog"\n')
    csv_file = tmp_path / "broken.csv"
    csv_file.write_text('caption\n"a cat\na dog\n')
    folder = tmp_path / "prompts_dir"
    folder.mkdir()
    for path, words in [(strings, ["line 1: a JSON str", ".txt file"]), (csv_file, ["malformed CSV", "quote"]),
                        (folder, ["is a folder; expected a file"])]:
        assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(path),
                     "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, str(path), *words)
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, prompts_txt, tiny_sd_folder, monkeypatch):
    f = tmp_path / "taken"
    f.write_text("x")
    argv = ["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt)]
    assert main([*argv, "--out", str(f)]) == 2
    _one_line_error(capsys, "is an existing file; expected a folder")
    import os

    monkeypatch.setattr(os, "access", lambda p, mode: False)  # as on a read-only filesystem
    assert main([*argv, "--out", str(tmp_path / "ro")]) == 2
    _one_line_error(capsys, "is not writable")


def test_eval_detect_scores_missing_or_a_folder(tmp_path, capsys, prompts_txt):
    for scores, words in [(tmp_path / "nope.parquet", ["does not exist"]),
                          (tmp_path, ["is a folder without scores.parquet"])]:
        assert main(["eval", "detect", "--scores", str(scores), "--labels", str(prompts_txt),
                     "--out", str(tmp_path / "ev")]) == 2
        _one_line_error(capsys, "--scores", *words)
    assert not (tmp_path / "ev").exists()


def test_calibration_is_checked_before_the_model_loads_and_nothing_is_written(tmp_path, capsys, prompts_txt,
                                                                              tiny_sd_folder, monkeypatch):
    import diffmem.models.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model must not load before --calibration is validated")

    out = tmp_path / "scan"
    argv = ["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt), "--detector", "noise-norm",
            "--draws", "1", "--out", str(out), "--quiet"]
    bad = tmp_path / "cal.json"
    bad.write_text("{not json")
    with monkeypatch.context() as m:
        m.setattr(loader, "load_model", no_load)
        assert main([*argv, "--calibration", str(tmp_path / "missing.json")]) == 2
        _one_line_error(capsys, "--calibration", "does not exist")
        assert main([*argv, "--calibration", str(bad)]) == 2
        _one_line_error(capsys, "is not a calibration.json")
        assert main([*argv, "--fpr", "0.1"]) == 2
        _one_line_error(capsys, "--fpr needs --calibration")
    assert not out.exists()  # nothing written: the corrected rerun is not refused as "other settings"
    assert main(argv) == 0


def test_resume_compares_prompts_by_content_and_names_what_differs(tmp_path, capsys, prompts_txt, tiny_sd_folder):
    out = tmp_path / "scan"
    argv = ["scan", "--model", str(tiny_sd_folder), "--detector", "noise-norm", "--draws", "1", "--out", str(out),
            "--quiet"]
    assert main([*argv, "--prompts", str(prompts_txt)]) == 0
    moved = tmp_path / "elsewhere" / "same.txt"
    moved.parent.mkdir()
    moved.write_text(prompts_txt.read_text())
    assert main([*argv, "--prompts", str(moved)]) == 0  # same prompts under another path: resumed
    capsys.readouterr()
    changed = tmp_path / "changed.txt"
    changed.write_text("a photo of a cat\na dog\n")
    assert main([*argv, "--prompts", str(changed)]) == 2
    _one_line_error(capsys, "prompts.sha256_16", "prompts.n_unique")
    argv[argv.index("--draws") + 1] = "2"
    assert main([*argv, "--prompts", str(prompts_txt)]) == 2
    _one_line_error(capsys, "settings.n_draws (2 now, 1 before)")


def test_scan_limit_and_verbose_after_the_subcommand(tmp_path, capsys, prompts_txt, tiny_sd_folder):
    import pyarrow.parquet as pq

    out = tmp_path / "scan"
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt), "--detector", "noise-norm",
                 "--draws", "1", "--limit", "2", "--out", str(out), "-v", "--quiet"]) == 0
    assert pq.read_table(out / "scores.parquet").column("text").to_pylist() == ["a photo of a cat", "a dog"]
    err = capsys.readouterr().err
    assert "%|" not in err  # --quiet: no progress bars


def test_quiet_run_prints_no_library_warnings(tmp_path, capsys, prompts_txt, tiny_sd_folder):
    assert main(["scan", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt), "--detector", "noise-norm",
                 "--draws", "1", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Warning" not in err and "warn" not in err.lower() and "%|" not in err, err


def test_extract_on_a_checkpoint_that_is_not_a_zoo_needs_its_training_images(tmp_path, capsys, prompts_txt,
                                                                              tiny_sd_folder):
    """Without --train-index only a zoo has training images to match; a user's checkpoint used to be matched
    against the default zoo's images, silently."""
    out = tmp_path / "o"
    assert main(["extract", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt), "--out", str(out)]) == 2
    _one_line_error(capsys, f"--model {tiny_sd_folder}: not a zoo", "--train-index FOLDER")
    assert not out.exists()


def test_zoo_folder_for_names_the_zoo_of_a_spec_without_loading_it(tiny_sd_folder, monkeypatch, tmp_path):
    from diffmem.zoo.load import zoo_folder_for
    from diffmem.zoo.paths import DEFAULT_CORPUS, zoo_dir

    collapse = zoo_dir("collapse").resolve()
    assert zoo_folder_for("zoo:collapse") == collapse
    assert zoo_folder_for(str(collapse / "pipeline")) == collapse  # the pipeline folder of a zoo, by path
    assert zoo_folder_for(str(collapse)) == collapse  # the zoo folder itself
    assert zoo_folder_for(None) == zoo_folder_for("zoo") == zoo_dir(DEFAULT_CORPUS).resolve()
    assert zoo_folder_for(str(tiny_sd_folder)) is None  # a checkpoint that is not a zoo
    assert zoo_folder_for("org/not-cached") is None
    monkeypatch.setenv("DIFFMEM_ZOO_SD", str(tmp_path / "unbuilt"))
    assert zoo_folder_for("zoo:sd") is None  # an unbuilt zoo: loading it fails later with its own message


# ---------------------------------------------------------------- issue #32: silently wrong results, tracebacks
@pytest.fixture()
def scored(tmp_path):
    """A scores.parquet of 9 prompts: 3 memorized (high scores) and 6 ordinary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"prompt {i}" for i in range(9)]
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(9)], "text": texts,
                             "noise-norm": [9.0, 8.0, 7.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}), path)
    return path, texts


def _labels(tmp_path, rows: list[dict]):
    import json

    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_eval_detect_refuses_conflicting_labels_naming_the_captions(scored, tmp_path, capsys):
    scores, texts = scored
    rows = [{"caption": t, "memorized": i < 3} for i, t in enumerate(texts)]
    rows += [{"caption": texts[0], "memorized": False}, {"caption": texts[4], "memorized": False}]  # the 2nd agrees
    out = tmp_path / "ev"
    assert main(["eval", "detect", "--scores", str(scores), "--labels", str(_labels(tmp_path, rows)),
                 "--out", str(out)]) == 2
    err = _one_line_error(capsys, "labels 1 caption(s) twice with different 'memorized' values",
                          "'prompt 0' (False and True)", "keep one label per caption")
    assert "prompt 4" not in err and not out.exists()


def test_eval_detect_refuses_a_text_label_column_and_counts_the_unlabelled(scored, tmp_path, capsys):
    import json

    scores, texts = scored
    rows = [{"caption": t, "memorized": i < 3, "kind": "signature" if i < 3 else "generic"}
            for i, t in enumerate(texts[:8])]  # the last prompt has no label
    labels = _labels(tmp_path, rows)
    argv = ["eval", "detect", "--scores", str(scores), "--labels", str(labels), "--out", str(tmp_path / "ev")]
    assert main([*argv, "--label-column", "kind"]) == 2
    _one_line_error(capsys, "column 'kind' holds 'signature', not a label", "true/false", "--rate-column")
    assert not (tmp_path / "ev").exists()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 of 9 scored prompts have no 'memorized' label" in out
    report = json.loads((tmp_path / "ev" / "detection.json").read_text())
    m = report["detectors"]["noise-norm"]["all"]
    assert report["n_unlabelled"] == 1 and (m["n_pos"], m["n_neg"], m["auroc"]) == (3, 5, 1.0)
    # 5 negatives: neither 1% (100 needed) nor 0.1% (1000) is measurable; n/a, not a number, with n_pos/n_neg
    line = next(row for row in out.splitlines() if row.startswith("noise-norm"))
    assert line.split()[1:] == ["1.0000", "3", "5", "n/a", "n/a"]
    assert "TPR at FPR 0.01 needs at least 100 negatives" in out and "at least 1000" in out


def test_label_values(tmp_path):
    from diffmem.cli.scan_commands import label_value
    from diffmem.errors import DiffmemError

    for value, want in [(True, True), (0, False), (1.0, True), ("MV", True), ("rv", False), ("no", False),
                        ("", None), (None, None)]:
        assert label_value(value, "f", "c") == want, value
    for value in ("generic", 2, 0.5):
        with pytest.raises(DiffmemError, match="not a label"):
            label_value(value, "f", "c")


def test_mitigate_on_a_model_that_is_not_a_zoo_needs_its_prompts(tmp_path, capsys, prompts_txt, tiny_sd_folder,
                                                                  monkeypatch):
    """Without --prompts, adversarial-finetune and nemo fitted a user's checkpoint on the zoo's captions (and matched
    against the zoo's training images); zoo defaults apply to zoo models only."""
    import diffmem.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("refused before the model loads"))
    for method in ("adversarial-finetune", "nemo"):
        for given, missing in [([], "--prompts FILE and --reference FILE"),
                               (["--prompts", str(prompts_txt)], "pass --reference FILE")]:
            assert main(["mitigate", method, "--model", str(tiny_sd_folder), *given,
                         "--out", str(tmp_path / "o")]) == 2
            _one_line_error(capsys, f"--model {tiny_sd_folder}: not a zoo", missing)
    assert not (tmp_path / "o").exists()


def test_a_mitigation_fitted_on_another_model_is_refused_before_loading(tmp_path, capsys, prompts_txt,
                                                                         tiny_sd_folder, tiny_sd_v_folder, monkeypatch):
    """`--calibration` refused another model's file; `--mitigation` applied it silently."""
    import diffmem.models.loader as loader

    assert main(["mitigate", "embedding-noise", "--model", str(tiny_sd_folder), "--prompts", str(prompts_txt),
                 "--reference", str(prompts_txt), "--out", str(tmp_path / "noise"), "--quiet"]) == 0
    mitigation = str(tmp_path / "noise" / "mitigation.json")
    capsys.readouterr()
    from PIL import Image

    train = tmp_path / "train"
    train.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(train / f"{i}.png")
    with monkeypatch.context() as m:
        m.setattr(loader, "load_model", lambda *a, **k: pytest.fail("refused before the model loads"))
        for argv in (["scan", "--detector", "noise-norm", "--draws", "1"], ["sample", "--steps", "2"],
                     ["extract", "--attack", "one-step-whitebox", "--train-index", str(train)]):
            assert main([*argv, "--model", str(tiny_sd_v_folder), "--prompts", str(prompts_txt), "--mitigation",
                         mitigation, "--out", str(tmp_path / argv[0])]) == 2
            _one_line_error(capsys, "was fitted on the model of fingerprint", "--accept-mitigation-mismatch")
    assert not any((tmp_path / c).exists() for c in ("scan", "sample", "extract"))
    assert main(["scan", "--detector", "noise-norm", "--draws", "1", "--model", str(tiny_sd_v_folder), "--prompts",
                 str(prompts_txt), "--mitigation", mitigation, "--accept-mitigation-mismatch", "--quiet",
                 "--out", str(tmp_path / "scan")]) == 0
    from diffmem.cli.scan_commands import with_mitigation
    from diffmem.errors import DiffmemError
    from diffmem.mitigators.base import load_mitigation

    with pytest.raises(DiffmemError, match="fitted on the model of fingerprint"):  # extract's path, after loading
        with_mitigation(load_model(tiny_sd_v_folder), load_mitigation(mitigation))


def test_refusals_come_before_the_weights_load(tmp_path, capsys, prompts_txt, tiny_sd_folder, tiny_sd_v_folder,
                                               monkeypatch):
    import json

    import diffmem.models.loader as loader

    out = tmp_path / "scan"
    argv = ["scan", "--prompts", str(prompts_txt), "--detector", "noise-norm", "--draws", "1", "--quiet"]
    assert main([*argv, "--model", str(tiny_sd_folder), "--out", str(out)]) == 0
    assert main(["calibrate", *argv[1:], "--model", str(tiny_sd_folder), "--out", str(tmp_path / "cal")]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(loader, "load_model", lambda *a, **k: pytest.fail("refused before the model loads"))
        # the resume mismatch: another model, other draws
        assert main([*argv, "--model", str(tiny_sd_v_folder), "--out", str(out)]) == 2
        _one_line_error(capsys, "holds a run with other settings", "model.fingerprint")
        assert main([*argv[:-2], "2", "--quiet", "--model", str(tiny_sd_folder), "--out", str(out)]) == 2
        _one_line_error(capsys, "settings.n_draws (2 now, 1 before)")
        # the calibration mismatch: calibrated on another model
        assert main([*argv, "--model", str(tiny_sd_v_folder), "--calibration",
                     str(tmp_path / "cal" / "calibration.json"), "--out", str(tmp_path / "s2")]) == 2
        _one_line_error(capsys, "--calibration", "model fingerprint", "--accept-calibration-mismatch")
    # a model_index.json naming another library for its last component: refused before any component loads
    copy = tmp_path / "pipe"
    shutil.copytree(tiny_sd_folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (copy / "model_index.json").write_text(json.dumps(index))
    loaded = []
    monkeypatch.setattr(loader, "_load_component", lambda *a, **k: loaded.append(a[1]))
    with pytest.raises(ModelLoadError, match="component vae names library 'os'"):
        load_model(copy)
    assert loaded == []
    assert main([*argv, "--model", str(copy), "--out", str(tmp_path / "s3")]) == 2
    _one_line_error(capsys, "component vae names library 'os'")
    assert loaded == [] and not (tmp_path / "s3").exists()


def test_a_settings_refusal_names_each_differing_key_with_both_values_in_full(tmp_path):
    from diffmem.errors import DiffmemError
    from diffmem.jobs import refuse_other_settings

    long = "r" * 80
    old = {"detectors": [{"name": "anisotropy", "gamma1": 1.0, "reference": long}, {"name": "noise-norm"}],
           "settings": {"n_draws": 1}}
    new = {"detectors": [{"name": "anisotropy", "gamma1": 2.0, "reference": long + "s"}, {"name": "noise-norm"}],
           "settings": {"n_draws": 1}}
    with pytest.raises(DiffmemError) as exc:
        refuse_other_settings(tmp_path, old, new)
    message = str(exc.value)
    assert "detectors.anisotropy.gamma1 (2.0 now, 1.0 before)" in message
    assert f'detectors.anisotropy.reference ("{long}s" now, "{long}" before)' in message
    assert "noise-norm" not in message and "n_draws" not in message and "\n" not in message


@pytest.mark.parametrize("kind", ["file", "bad-json", "not-config"])
def test_zoo_build_work_dir_tracebacks_are_one_line(kind, tmp_path, capsys):
    work = tmp_path / "work"
    if kind == "file":
        work.write_text("x")
        words = ["is an existing file; expected a folder"]
    else:
        work.mkdir()
        (work / "zoo_config.json").write_text("{not json" if kind == "bad-json" else "[1, 2]")
        words = ["zoo_config.json", "not valid JSON" if kind == "bad-json" else "not a zoo build's configuration"]
    assert main(["zoo", "build", "--out", str(tmp_path / "zoo"), "--work-dir", str(work), "--no-label"]) == 2
    _one_line_error(capsys, "--work-dir", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_deepssim_train_on_too_few_images_is_refused(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(images / f"{i}.png")
    assert main(["deepssim", "train", "--images", str(images), "--out", str(tmp_path / "ds"), "--steps", "1"]) == 2
    _one_line_error(capsys, "holds 4 image(s); DeepSSIM needs at least 50")
    assert not (tmp_path / "ds").exists()
