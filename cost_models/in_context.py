"""Layers timed in context: onnxruntime's per-node profile of a whole network (issue 11 item 4).

A layer exported and timed alone pays reorders and runs cache-hot; inside a network it does
neither. :func:`trace_network` runs a whole network in an onnxruntime session with
``enable_profiling``, reads the JSON trace (one ``"cat": "Node"`` event per node per run, durations
in µs), takes every node's median over the runs, and maps nodes back to the model's modules from the
scope names the TorchScript exporter writes (``/blocks/blocks.0/dw/conv/Conv…`` →
``blocks.0.dw``: a convolution and its activation count for the layer that owns them). Reorder
nodes (``ReorderInput``/``ReorderOutput``, where blocked and unblocked regions meet) are costs of
their own. ``overhead_ms`` is the per-run time the nodes do not account for (onnxruntime's
``model_run`` minus Σ nodes): end to end = Σ nodes + overhead. Profiling itself costs time per
node, so ``overhead_ms`` of a profiled run is an upper bound of the unprofiled one.

This is the measurement only: fitting per-node costs and a per-network overhead into the table and
the regressor is not built yet (see /work/notes/issue-11.md).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from typing import TYPE_CHECKING, Any

from cost_models.runner import export_layer_onnx

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["REORDER_OPS", "node_owner", "trace_network"]

REORDER_OPS = ("ReorderInput", "ReorderOutput")
_KERNEL_SUFFIX = "_kernel_time"


def node_owner(node_name: str, modules: set[str] | None = None) -> str | None:
    """The module a node belongs to, from its exporter scope name: ``/blocks/blocks.0/dw/conv/Conv``
    → ``blocks.0.dw`` (the parent of the leaf module, so a conv and its activation share an owner).
    ``modules`` (the model's module names) picks the deepest scope that is a module; without it the
    last scope is taken as the op. ``None`` for a node without a scope (e.g. an inserted Reorder)."""
    name = node_name.removesuffix(_KERNEL_SUFFIX)
    if not name.startswith("/"):
        return None
    path = [seg.split(".")[-1] for seg in name.strip("/").split("/")]
    if modules is None:
        path = path[:-1]
    else:
        prefixes = [".".join(path[:i]) for i in range(len(path), 0, -1)]
        found = next((p for p in prefixes if p in modules), None)
        if found is None:
            return None
        path = found.split(".")
    if len(path) >= 2:
        path = path[:-1]
    return ".".join(path) or None


def trace_network(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1, runs: int = 50,
                  warmup: int = 10) -> dict[str, Any]:
    """Per-node latency of ``model`` (eval mode, exported as is) inside one onnxruntime CPU session.

    Returns ``{"nodes": [{"name", "op", "owner", "ms"}], "layers": {owner: ms}, "reorder_ms",
    "other_ms", "nodes_ms", "model_run_ms", "overhead_ms", "runs"}``: medians over ``runs``
    profiled runs after ``warmup`` unprofiled ones, in milliseconds. ``layers`` sums the nodes each
    module owns; ``reorder_ms`` the Reorder nodes; ``other_ms`` nodes with no owner that are not
    Reorders; ``overhead_ms = model_run_ms - nodes_ms``.
    """
    import copy

    import onnxruntime as ort
    import torch

    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs: expected a positive integer, got {runs!r}")
    module = copy.deepcopy(model).cpu().eval()
    example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0))
    model_bytes = export_layer_onnx(module, example)
    feeds = {"x": example.numpy()}
    with tempfile.TemporaryDirectory(prefix="hwsplit-trace-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "trace")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            session.run(None, feeds)
        # the warm-up runs are in the trace too: only the last ``runs`` model_run windows are kept
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    names = {n for n, _ in module.named_modules() if n}
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs:]
    start = model_runs[0]["ts"] if model_runs else 0
    per_node: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith(_KERNEL_SUFFIX) or e.get("ts", 0) < start:
            continue
        per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)
        ops[e["name"]] = e.get("args", {}).get("op_name", "")
    nodes = []
    layers: dict[str, float] = {}
    reorder = other = 0.0
    for name, durations in per_node.items():
        ms = statistics.median(durations)
        owner = node_owner(name, names)
        nodes.append({"name": name.removesuffix(_KERNEL_SUFFIX), "op": ops[name], "owner": owner, "ms": ms})
        if ops[name] in REORDER_OPS:
            reorder += ms
        elif owner is None:
            other += ms
        else:
            layers[owner] = layers.get(owner, 0.0) + ms
    nodes_ms = sum(n["ms"] for n in nodes)
    run_ms = statistics.median(e["dur"] / 1e3 for e in model_runs) if model_runs else float("nan")
    return {"nodes": nodes, "layers": layers, "reorder_ms": reorder, "other_ms": other, "nodes_ms": nodes_ms,
            "model_run_ms": run_ms, "overhead_ms": run_ms - nodes_ms, "runs": len(model_runs)}
