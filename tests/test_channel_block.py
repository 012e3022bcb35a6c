"""Channel-block detection on a real onnxruntime session (cost_models.channel_block)."""

from __future__ import annotations

import os
import tempfile

import pytest

from cost_models.channel_block import PROBE_CHANNELS, detect_channel_block, read_blocking
from cost_models.runner import export_layer_onnx


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _optimized(module, example):
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "o.onnx")
        ort.InferenceSession(export_layer_onnx(module, example), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def test_detected_block_is_what_onnxruntime_pads_to() -> None:
    import torch
    from torch import nn

    found = detect_channel_block()
    block = found["channel_block"]
    ev = found["evidence"]
    assert block in (1, 4, 8, 16, 32, 64)
    if block == 1:
        assert not ev["padded_out_channels"] or len(ev["padded_out_channels"]) < len(PROBE_CHANNELS)
        pytest.skip("onnxruntime blocks no convolution on this CPU")
    assert ev["padded_out_channels"] == [-(-c // block) * block for c in PROBE_CHANNELS]
    assert ev["nchwc_ops"]["Conv"] >= len(PROBE_CHANNELS) and ev["nchwc_ops"].get("ReorderOutput", 0) >= 1
    # an independent network: a width one multiple of 4 above k blocks is padded to k + 1 blocks,
    # a width of exactly k blocks is not padded
    widths = [2 * block + 4, 3 * block]
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, widths[0], 1), nn.Conv2d(widths[0], widths[1], 1))
    seen = read_blocking(_optimized(net.eval(), torch.randn(1, 3, 8, 8)))
    assert [c["out_channels"] for c in seen["blocked_convs"]][1:] == [3 * block, 3 * block]
    # on x86 the block follows the vector width the CPU has (AVX-512: 16 floats, AVX2: 8)
    flags = _cpu_flags()
    if "avx512f" in flags:
        assert block == 16
    elif "avx2" in flags:
        assert block == 8


def test_profile_records_the_block(tmp_path) -> None:
    from cost_models.profiler import profile_family
    from hwsplit.specs import LayerSpec

    profile = profile_family(layers=[LayerSpec("pwconv", 8, 8, height=4, width=4)], out=tmp_path / "p.json",
                             time_budget_s=0.002, warmup=1, threads=1, rounds=2)
    assert profile["channel_block"] == detect_channel_block()["channel_block"]
    assert profile["channel_block_evidence"]["probe_out_channels"] == list(PROBE_CHANNELS)
