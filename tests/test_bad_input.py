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
