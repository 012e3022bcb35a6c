"""The backend's channel granularity, read from what it actually runs (docs/design.md §6, issue 11).

onnxruntime's CPU provider rewrites convolutions into blocked NCHWc kernels (domain
``com.microsoft.nchwc``): channels are padded up to the block (16 with AVX-512, 8 with AVX2),
``ReorderInput``/``ReorderOutput`` nodes convert where blocked and unblocked regions meet. A layer
whose width is not a multiple of the block pays for the padding, so growth priced in blocks of that
size (``grow --channel-multiple auto``) buys channels where the device does.

:func:`detect_channel_block` builds a small probe network whose pointwise convolutions output 20, 36
and 52 channels, lets onnxruntime optimise it at ``ORT_ENABLE_ALL`` with ``optimized_model_filepath``
set, and reads the optimised graph: each blocked convolution's weight has its output channels padded
to a multiple of the block B, and the greatest common divisor of the padded counts is B (for
B = 4, 8, 16, 32, 64 the padded counts of 20, 36, 52 have gcd exactly B). A graph without blocked
convolutions gives B = 1 (no channel blocking). Never hard-coded per CPU.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any

from cost_models.runner import export_layer_onnx

log = logging.getLogger(__name__)

__all__ = ["NCHWC_DOMAIN", "PROBE_CHANNELS", "detect_channel_block", "read_blocking"]

NCHWC_DOMAIN = "com.microsoft.nchwc"
#: Output channels of the probe's pointwise convolutions: multiples of 4 (onnxruntime blocks no
#: convolution whose input channels are not) just above 16, 32 and 48, so that their padded counts'
#: gcd is the block for every power-of-two block from 4 to 64.
PROBE_CHANNELS = (20, 36, 52)


def _probe_network() -> tuple[Any, Any]:
    import torch
    from torch import nn

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    prev = 16
    for c in PROBE_CHANNELS:
        layers += [nn.Conv2d(prev, c, 1), nn.ReLU()]
        prev = c
    gen = torch.Generator().manual_seed(0)
    module = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module, torch.randn(1, 3, 16, 16, generator=gen)


def read_blocking(model: Any) -> dict[str, Any]:
    """What an optimised ONNX graph (an ``onnx.ModelProto``) shows of channel blocking: counts of
    ``com.microsoft.nchwc`` ops by type, and every blocked Conv's (output channels of its weight,
    group, kernel)."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    ops: dict[str, int] = {}
    convs = []
    for node in model.graph.node:
        if node.domain != NCHWC_DOMAIN:
            continue
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            dims = inits[node.input[1]]
            convs.append({"weight_shape": dims, "out_channels": int(dims[0]), "group": int(group or 1)})
    return {"nchwc_ops": ops, "blocked_convs": convs}


def detect_channel_block(threads: int = 1) -> dict[str, Any]:
    """Run the probe network in an onnxruntime CPU session and read its channel block.

    Returns ``{"channel_block": B, "evidence": {...}}``: B the block (1 when nothing is blocked),
    the evidence the nchwc op counts and the padded output channels of the probe's pointwise
    convolutions next to the channels asked for.
    """
    import onnx
    import onnxruntime as ort

    module, example = _probe_network()
    model_bytes = export_layer_onnx(module, example)
    with tempfile.TemporaryDirectory(prefix="hwsplit-block-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the "hardware specific optimizations" warning is the point here
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    seen = read_blocking(optimized)
    pointwise = [c for c in seen["blocked_convs"] if c["group"] == 1 and c["weight_shape"][2:] == [1, 1]]
    padded = [c["out_channels"] for c in pointwise]
    block = 1
    if len(padded) == len(PROBE_CHANNELS) and all(p >= c for p, c in zip(padded, PROBE_CHANNELS)):
        block = math.gcd(*padded)
    elif seen["blocked_convs"]:
        log.warning("channel block: onnxruntime blocked only %d of the probe's %d pointwise convolutions; "
                    "recording block 1", len(padded), len(PROBE_CHANNELS))
    evidence = {"method": "onnxruntime optimized_model_filepath at ORT_ENABLE_ALL, probe network",
                "onnxruntime": ort.__version__, "nchwc_ops": seen["nchwc_ops"],
                "probe_out_channels": list(PROBE_CHANNELS), "padded_out_channels": padded}
    log.info("channel block %d (padded %s for %s)", block, padded, list(PROBE_CHANNELS))
    return {"channel_block": block, "evidence": evidence}
