"""benchmarks/gpu_throughput.py stays runnable: its tiny CPU configuration runs in seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_reports_every_pattern(gpu_script, tmp_path):
    out = tmp_path / "gpu.json"
    record = gpu_script.main(["--tiny", "--device", "cpu", "--prompts", "6", "--draws", "2", "--batch-size", "4",
                              "--peak-tflops", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == record
    results = record["results"]
    assert set(results) == {"a_reference_per_prompt", "b_batched_pairs", "c_engine", "d_conditional_forwards_only"}
    for name in ("a_reference_per_prompt", "b_batched_pairs"):  # the same scores as the engine
        assert results[name]["max_abs_diff_vs_engine"] < 1e-4
    # FLOPs: a and b push 2*D rows per prompt, the engine D per prompt + D once, d D per prompt
    row, text = record["flops_per_unet_row"], record["flops_per_text_prompt"]
    assert row > 0 and text > 0
    assert results["a_reference_per_prompt"]["tflop"] == round((2 * 2 * 6 * row + 6 * text) / 1e12, 4)
    assert results["c_engine"]["tflop"] == round(((2 * 6 + 2) * row + 6 * text) / 1e12, 4)
    assert 0 < results["c_engine"]["share_of_fp16_peak"] == pytest.approx(results["c_engine"]["achieved_tflops"],
                                                                          abs=1e-4)


def test_sd15_config_has_sd15_shape(gpu_script):
    """The full configuration is Stable Diffusion 1.5's UNet (built on the meta device: no memory, no time)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu_script.SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
