"""The planted-copy matcher benchmark's pieces, by hand: the plantings, Carlini's tiled L2, the evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_script import load_benchmark

bench = load_benchmark("matcher_planted")


def test_plantings_are_the_transformations_they_name():
    g = torch.Generator().manual_seed(0)
    x, other = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    p = bench.plant(x, other, np.random.default_rng(0))
    assert set(p) == set(bench.PLANTINGS)
    assert torch.equal(p["exact"], x) and torch.equal(p["flipped"], x.flip(-1))
    assert torch.equal(p["shifted"][..., 2:, 2:], x[..., :30, :30])  # moved 2 px down and right
    assert torch.equal(p["partial"][..., :16], x[..., :16]) and torch.equal(p["partial"][..., 16:], other[..., 16:])
    assert p["cropped"].shape == x.shape and not torch.equal(p["cropped"], x)


def test_tiled_l2_is_the_worst_tile_of_the_nearest_image():
    index = torch.zeros(2, 3, 8, 8)
    index[1] += 1.0
    q = torch.zeros(2, 3, 8, 8)
    q[1, :, :4, :4] = 0.5  # one of 4 tiles off by 0.5 everywhere: its tile L2 / sqrt(tile size) is 0.5
    d = bench.tiled_l2_nearest(q, index, tiles=2)
    assert d.tolist() == pytest.approx([0.0, 0.5])


def test_evaluation_by_hand():
    neg = np.arange(100) / 100.0  # dev and test non-copies alike: the 0.99 quantile is 0.99
    pos = {"a": np.full(10, 2.0), "b": np.r_[np.full(5, 2.0), np.zeros(5)]}
    r = bench.evaluate(pos, neg, neg, fpr=0.01)
    assert r["threshold_at_dev_fpr"] == 0.99 and r["fpr_test"] == 0.0
    assert r["recall_by_planting"] == {"a": 1.0, "b": 0.5} and r["auroc_by_planting"]["a"] == 1.0
    assert r["f1_by_planting"]["b"] == pytest.approx(2 * 1.0 * 0.5 / 1.5, abs=1e-4)
