"""Layers timed in context: onnxruntime's per-node profile of a whole network (cost_models.in_context)."""

from __future__ import annotations

import pytest

from cost_models.in_context import REORDER_OPS, node_owner, trace_network
from hwsplit.models import build_model


def test_node_names_map_to_the_layer_that_owns_them() -> None:
    modules = {"stem", "stem.conv", "stem.act", "blocks", "blocks.0", "blocks.0.dw", "blocks.0.dw.conv",
               "blocks.0.dw.act", "classifier"}
    assert node_owner("/blocks/blocks.0/dw/conv/Conv_output_0_nchwc_kernel_time", modules) == "blocks.0.dw"
    assert node_owner("/blocks/blocks.0/dw/act/Mul/QuickGeluFusion/_kernel_time", modules) == "blocks.0.dw"
    assert node_owner("/stem/conv/Conv_output_0_nchwc_kernel_time", modules) == "stem"
    assert node_owner("/classifier/Gemm_kernel_time", modules) == "classifier"
    assert node_owner("ReorderOutput_token_84_kernel_time", modules) is None
    assert node_owner("/blocks/blocks.0/dw/conv/Conv") == "blocks.0.dw"


def test_trace_of_a_real_network_accounts_for_every_layer() -> None:
    model = build_model("mobilenet_v1_cifar", stem_width=24, widths=[40] * 13)  # not multiples of 16
    trace = trace_network(model, (1, 3, 32, 32), runs=5, warmup=2)
    blocks = len([n for n, _ in model.named_modules() if n.endswith(".dw")])
    owners = set(trace["layers"])
    assert "stem" in owners and all(f"blocks.{i}.dw" in owners and f"blocks.{i}.pw" in owners for i in range(blocks))
    assert all(v > 0 for v in trace["layers"].values())
    reorders = [n for n in trace["nodes"] if n["op"] in REORDER_OPS]
    assert reorders and trace["reorder_ms"] == pytest.approx(sum(n["ms"] for n in reorders))
    assert trace["nodes_ms"] == pytest.approx(sum(trace["layers"].values()) + trace["reorder_ms"] + trace["other_ms"])
    assert trace["runs"] == 5
    assert trace["model_run_ms"] == pytest.approx(trace["nodes_ms"] + trace["overhead_ms"])
    assert trace["overhead_ms"] >= 0
