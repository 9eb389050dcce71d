"""The on-disk cache of the VAE round trip (diffmem.cache, diffmem.zoo.load.cached_vae_roundtrip): a hit is
bit-identical to a fresh computation, any change of what the result depends on misses, and a corrupt or
mismatching entry is recomputed, never trusted."""

from __future__ import annotations

import pytest
import torch

import diffmem.zoo.load as zoo_load
from diffmem.cache import CACHE_ENV, cache_root
from diffmem.models import load_model
from diffmem.zoo.load import cached_vae_roundtrip, vae_roundtrip, vae_roundtrip_key


@pytest.fixture(scope="module")
def model(tiny_sd_folder):
    return load_model(tiny_sd_folder)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def computed(monkeypatch) -> list[int]:
    """Counts the round trips actually computed (a cache hit computes none)."""
    calls: list[int] = []
    real = zoo_load.vae_roundtrip

    def counting(model, images, batch_size=512):
        calls.append(len(images))
        return real(model, images, batch_size)

    monkeypatch.setattr(zoo_load, "vae_roundtrip", counting)
    return calls


def test_a_cache_hit_equals_a_fresh_computation_exactly(model, images, computed, tmp_path):
    fresh = vae_roundtrip(model, images)
    first = cached_vae_roundtrip(model, images, root=tmp_path)  # a miss: computed and stored
    assert computed == [3] and torch.equal(first, fresh)
    entries = list((tmp_path / "vae_roundtrip").glob("*.pt"))
    assert [p.stem for p in entries] == [vae_roundtrip_key(model, images)]
    again = cached_vae_roundtrip(model, images, root=tmp_path)  # a hit: nothing computed
    assert computed == [3]
    assert again.dtype == fresh.dtype and torch.equal(again, fresh)


def test_a_changed_key_misses(model, images, computed, tmp_path):
    cached_vae_roundtrip(model, images, root=tmp_path)
    key = vae_roundtrip_key(model, images)
    other = images.clone()
    other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0]  # one pixel of one image
    assert vae_roundtrip_key(model, other) != key
    assert torch.equal(cached_vae_roundtrip(model, other, root=tmp_path), vae_roundtrip(model, other))
    assert vae_roundtrip_key(model, images, batch_size=2) != key
    assert computed == [3, 3]
    with torch.no_grad():  # one VAE weight: the same folder and fingerprint, another VAE
        weight = next(model.vae.parameters())
        weight.view(-1)[0] += 1e-3
        try:
            assert vae_roundtrip_key(model, images) != key
            assert torch.equal(cached_vae_roundtrip(model, images, root=tmp_path), vae_roundtrip(model, images))
        finally:
            weight.view(-1)[0] -= 1e-3
    assert computed == [3, 3, 3] and vae_roundtrip_key(model, images) == key


@pytest.mark.parametrize("damage", ["truncated", "another key", "wrong shape", "not finite"])
def test_a_corrupt_or_mismatching_entry_is_recomputed_and_rewritten(model, images, computed, tmp_path, damage):
    fresh = cached_vae_roundtrip(model, images, root=tmp_path)
    path = tmp_path / "vae_roundtrip" / f"{vae_roundtrip_key(model, images)}.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        entry = torch.load(path, weights_only=True)
        if damage == "another key":
            entry["key"] = "0" * 32
        elif damage == "wrong shape":
            entry["value"] = entry["value"][:2]
        else:
            entry["value"][0, 0, 0, 0] = float("nan")
        torch.save(entry, path)
    got = cached_vae_roundtrip(model, images, root=tmp_path)
    assert computed == [3, 3] and torch.equal(got, fresh)
    assert cached_vae_roundtrip(model, images, root=tmp_path) is not None and computed == [3, 3]  # rewritten: a hit


def test_an_unwritable_cache_still_returns_the_round_trip(model, images, computed, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    got = cached_vae_roundtrip(model, images, root=blocker)
    assert computed == [3] and torch.equal(got, vae_roundtrip(model, images))


def test_the_cache_root_is_diffmem_cache_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "diffmem"
