"""Where users keep models: zoo names, local folders, the Hugging Face cache (offline), single files."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from diffmem.cli.main import main
from diffmem.errors import ModelLoadError
from diffmem.models import load_model, sources
from diffmem.models.sources import CONFIG_FILES, ZOO_MODELS, resolve

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(cache, repo_id, folder, revision=REVISION):
    """Lay ``folder`` out as huggingface_hub caches a repository: content-addressed blobs, a snapshot of
    symlinks into them, and refs/main naming the revision."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _eps(model):
    torch.manual_seed(0)
    x = torch.randn(2, *model.latent_shape)
    return model.predict_noise(x, 500, model.encode_prompts(["a red circle", "a blue square"]))


def test_hub_id_loads_from_the_cache_offline(tiny_sd_folder, offline_cache):
    snapshot = hub_layout(offline_cache, "someorg/tiny-sd", tiny_sd_folder)
    assert resolve("someorg/tiny-sd").folder == snapshot
    from_hub, from_folder = load_model("someorg/tiny-sd"), load_model(tiny_sd_folder)
    assert "models--someorg--tiny-sd/snapshots/" + REVISION in from_hub.source
    assert from_hub.fingerprint == from_folder.fingerprint  # same files, same identity
    assert torch.equal(_eps(from_hub), _eps(from_folder))


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tiny_sd_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_layout(tmp_path / "hf" / "hub", "someorg/tiny-sd", tiny_sd_folder)
    assert sources.hub_cache_dir() == tmp_path / "hf" / "hub"
    assert resolve("someorg/tiny-sd").folder == snapshot


def test_hub_id_missing_from_the_cache_names_the_cache_and_the_command(offline_cache):
    with pytest.raises(ModelLoadError) as err:
        load_model("someorg/absent")
    msg = str(err.value)
    assert str(offline_cache / "models--someorg--absent") in msg
    assert "HF_HUB_OFFLINE=1" in msg and "huggingface-cli download someorg/absent" in msg


def test_local_folder_wins_over_a_hub_id_of_the_same_spelling(tiny_sd_folder, offline_cache, monkeypatch):
    monkeypatch.chdir(tiny_sd_folder.parent.parent)
    spec = f"{tiny_sd_folder.parent.name}/{tiny_sd_folder.name}"  # looks like org/name, exists locally
    assert resolve(spec).kind == "folder"


def test_zoo_names_and_an_extension(tiny_sd_folder, monkeypatch):
    assert resolve(None).folder == resolve("zoo").folder == resolve("zoo:sd").folder
    with pytest.raises(ModelLoadError, match="unknown zoo model 'zoo:nope'; known: .*zoo:collapse"):
        resolve("zoo:nope")
    monkeypatch.setitem(ZOO_MODELS, "zoo:tiny", lambda: tiny_sd_folder)
    assert load_model("zoo:tiny").fingerprint == load_model(tiny_sd_folder).fingerprint
    with pytest.raises(ModelLoadError, match="--config applies to single-file"):
        resolve("zoo", config="sd1")


def test_single_file_errors_name_what_is_missing(tiny_sd_folder, tmp_path, offline_cache):
    with pytest.raises(ModelLoadError, match=r"checkpoint file '.*absent.safetensors' does not exist"):
        load_model(tmp_path / "absent.safetensors")
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.weird": torch.zeros(2)}, str(ckpt))
    # a family name offline: the reference repository's config files must be cached; every one is named
    with pytest.raises(ModelLoadError) as err:
        load_model(ckpt, config="sd1")
    msg = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and all(f in msg for f in CONFIG_FILES)
    # a config folder that is not a diffusers folder
    with pytest.raises(ModelLoadError, match="lacks model_index.json, unet/config.json"):
        load_model(ckpt, config=tmp_path)
    # a config folder that is fine, but a file that is no Stable Diffusion checkpoint: diffusers' reason, one line
    with pytest.raises(ModelLoadError, match=r"cannot load single-file checkpoint '.*model.safetensors': \w+"):
        load_model(ckpt, config=tiny_sd_folder)
    with pytest.raises(ModelLoadError, match="--config applies to single-file .safetensors checkpoints"):
        load_model(tiny_sd_folder, config="sd1")


def test_family_config_found_in_the_cache_is_used(tiny_sd_folder, offline_cache):
    """``--config sd1`` resolves to the cached reference repository's snapshot (configs only are enough)."""
    snapshot = hub_layout(offline_cache, sources.FAMILIES["sd1"], tiny_sd_folder)
    assert sources.family_config("sd1") == snapshot


def test_cli_config_flag_reaches_the_loader(tmp_path, offline_cache, capsys):
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    assert main(["scan", "--model", str(ckpt), "--config", "sd2", "--out", str(tmp_path / "o")]) == 2
    assert "stabilityai/stable-diffusion-2-1" in capsys.readouterr().err
