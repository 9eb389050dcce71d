"""``benchmarks/extraction.py``'s choice of prompts on either zoo: the evaluation subset per kind, and
calibration captions that are disjoint from it and labelled not memorized."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_script import load_benchmark


def _script():
    return load_benchmark("extraction")


def _rows(kind: str, n: int, memorized_every: int = 0) -> list[dict]:
    return [{"kind": kind, "caption": f"{kind} {i}", "memorized": bool(memorized_every and i % memorized_every == 0)}
            for i in range(n)]


def test_sd_like_labels_calibrate_on_leftover_ordinary_captions_and_titles_never_memorized():
    script = _script()
    labels = _rows("signature", 64, 2) + _rows("generic", 147) + _rows("title", 1000, 25) + _rows("template", 30, 1)
    chosen, calib = script.stratified(labels, np.random.default_rng(0))
    kinds = [r["kind"] for r in chosen]
    assert (kinds.count("signature"), kinds.count("generic"), kinds.count("title"), kinds.count("template")) == \
        (64, 80, 100, 30)
    assert "generic_scene" not in kinds  # a kind the zoo lacks contributes nothing
    assert not {r["caption"] for r in chosen} & {r["caption"] for r in calib}
    assert not any(r["memorized"] for r in calib)
    calib_kinds = [r["kind"] for r in calib]
    # 147 - 80 ordinary captions left; titles: 200 of the 900 left, skipping the memorized ones
    assert (calib_kinds.count("generic"), calib_kinds.count("title")) == (67, 200)


def test_collapse_labels_calibrate_on_200_generic_captions_as_before():
    """The collapse zoo has no titles: calibration is the next 200 generic captions of the same permutation,
    as the script chose them before the SD-like zoo (so extraction_collapse.json's attack table still holds)."""
    script = _script()
    labels = _rows("generic", 1152) + _rows("signature", 300, 3) + _rows("generic_scene", 500)
    rng = np.random.default_rng(0)
    order = None
    for kind in script.SUBSET:  # the draws stratified makes, in its order, up to the generic kind
        n = sum(r["kind"] == kind for r in labels)
        perm = rng.permutation(n)
        if kind == "generic":
            order = perm
            break
    generic = [r for r in labels if r["kind"] == "generic"]
    _, calib = script.stratified(labels, np.random.default_rng(0))
    assert [r["caption"] for r in calib] == [generic[i]["caption"] for i in order[80:280]]


def test_fid_terms_split_a_shift_from_a_spread():
    """Shifting every generated image moves only the mean term (by the shift's squared norm); scaling their
    spread moves only the generated trace (by the square of the scale)."""
    import torch

    script = _script()
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 3, generator=g)
    fake = torch.randn(400, 3, generator=g)

    def identity(x):
        return x

    base = script.fid_terms(real, fake, identity)
    shifted = script.fid_terms(real, fake + torch.tensor([3.0, 0.0, 4.0]), identity)
    assert shifted["mean_term"] - base["mean_term"] == pytest.approx(25.0, abs=0.5)
    assert shifted["trace_generated"] == pytest.approx(base["trace_generated"], rel=1e-9)
    spread = script.fid_terms(real, 2 * (fake - fake.mean(0)) + fake.mean(0), identity)
    assert spread["trace_generated"] == pytest.approx(4 * base["trace_generated"], rel=1e-6)  # float32 input
    assert spread["mean_term"] == pytest.approx(base["mean_term"], rel=1e-5)
    assert base["trace_reference"] == pytest.approx(float(torch.cov(real.double().T).trace()), rel=1e-12)


def test_only_its_own_records_count_as_overwritable(tmp_path):
    script = _script()
    own, other, text = tmp_path / "own.json", tmp_path / "other.json", tmp_path / "notes.txt"
    own.write_text('{"benchmark": "extraction", "attacks": {}}')
    other.write_text('{"benchmark": "detection"}')
    text.write_text("not json")
    assert script.is_extraction_record(own)
    assert not script.is_extraction_record(other) and not script.is_extraction_record(text)
