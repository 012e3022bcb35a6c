"""The backend's channel granularity, read from what it actually runs (docs/design.md §6).

onnxruntime's CPU provider rewrites convolutions into blocked NCHWc kernels (domain
``com.microsoft.nchwc``): output channels are padded up to the block, a depthwise conv whose
channels are not a multiple of some smaller granularity falls back to the plain kernel, and
``ReorderInput``/``ReorderOutput`` nodes appear where blocked and unblocked regions meet. Nothing
here is hard-coded per CPU: :func:`detect_channel_block` builds small conv nets of several channel
counts, lets onnxruntime write its optimised graph (``SessionOptions.optimized_model_filepath`` at
``ORT_ENABLE_ALL``) and reads the block off the padded weight shapes, and the depthwise
granularity off which depthwise convs stayed blocked.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from cost_models.context import padded

__all__ = ["NCHWC_DOMAIN", "detect_channel_block", "graph_summary", "optimized_graph", "probe_net"]

NCHWC_DOMAIN = "com.microsoft.nchwc"
#: Channel counts probed: odd, even, multiples of 4 and 8 but not 16, multiples of 16.
PROBE_CHANNELS = (18, 20, 24, 40, 48, 50)


def graph_summary(onnx_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The nodes of an (optimised) ONNX graph: domain, op type, name, weight shape, group."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    out = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out.append({"domain": node.domain or "ai.onnx", "op": node.op_type, "name": node.name,
                    "weight": inits.get(node.input[1]) if len(node.input) > 1 else None,
                    "group": int(attrs.get("group", 1))})
    return out


def probe_net(c: int) -> Any:
    """stem conv 3→c, depthwise c, pointwise c→c: the family's three conv kinds at ``c`` channels."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c),
                         nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU()).eval()


def optimized_graph(module: Any, example: Any, *, threads: int = 1) -> list[dict[str, Any]]:
    """The graph onnxruntime (CPU provider, ``ORT_ENABLE_ALL``) actually runs for ``module``."""
    import onnxruntime as ort

    from cost_models.profiling.runner import export_layer_onnx, session_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)  # the graph the timings run, so the same settings
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(export_layer_onnx(module, example), opts, providers=["CPUExecutionProvider"])
        return graph_summary(opts.optimized_model_filepath)


def detect_channel_block(*, threads: int = 1, channels: tuple[int, ...] = PROBE_CHANNELS) -> dict[str, Any]:
    """The CPU provider's NCHWc block and depthwise granularity on this machine.

    Returns ``{"channel_block": int, "depthwise_multiple": int, "evidence": [...]}``: the block is
    the smallest power of two that explains every blocked conv's padded output channels
    (``ceil(c / block) · block``); 1 when onnxruntime runs no blocked kernel (no NCHWc
    transformer on this CPU). ``depthwise_multiple`` is the smallest power of two dividing every
    depthwise channel count that stayed blocked and none that fell back (1 if none fell back).
    """
    import torch

    evidence = []
    for c in channels:
        nodes = optimized_graph(probe_net(c), torch.zeros(1, 3, 8, 8), threads=threads)
        convs = [n for n in nodes if n["op"] in ("Conv", "FusedConv")]
        evidence.append({"channels": c, "reorders": sum(n["op"].startswith("Reorder") for n in nodes),
                         "convs": [{"blocked": n["domain"] == NCHWC_DOMAIN, "depthwise": n["group"] > 1,
                                    "weight": n["weight"]} for n in convs]})
    padded_out = [(e["channels"], conv["weight"][0]) for e in evidence for conv in e["convs"]
                  if conv["blocked"] and conv["weight"]]
    block = 1
    if padded_out:
        block = next((b for b in (2 ** k for k in range(0, 8)) if all(p == padded(c, b) for c, p in padded_out)),
                     max(p for _, p in padded_out))
    dw_blocked = [e["channels"] for e in evidence for conv in e["convs"] if conv["depthwise"] and conv["blocked"]]
    dw_plain = [e["channels"] for e in evidence for conv in e["convs"] if conv["depthwise"] and not conv["blocked"]]
    dw_multiple = 1
    if dw_plain and dw_blocked:
        dw_multiple = max((m for m in (2 ** k for k in range(0, 8))
                           if all(c % m == 0 for c in dw_blocked) and not any(c % m == 0 for c in dw_plain)),
                          default=block)
    elif dw_plain:
        dw_multiple = 0  # depthwise never blocked
    return {"channel_block": int(block), "depthwise_multiple": int(dw_multiple), "method":
            "onnxruntime optimized_model_filepath at ORT_ENABLE_ALL: padded weights of com.microsoft.nchwc Conv",
            "evidence": evidence}
