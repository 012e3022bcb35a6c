"""Per-node times of a whole network in onnxruntime, and which layer each node belongs to.

:func:`node_times` runs a network with onnxruntime's per-node profiling
(``SessionOptions.enable_profiling``; the JSON trace has one ``"cat": "Node"`` event per node and
run, with its duration in µs), :func:`parse_trace` averages the events per node and
:func:`attribute_nodes` maps every node back to a layer of the network (a conv's fused activation
to its conv, a ``Reorder*`` node to the layer before it, pooling and the last reorder to the
classifier). The profiler lengthens every node it times by a few µs, so these times give the
*shape* of a layer's cost (how it grows with channels), not its absolute in-context time
(:mod:`cost_models.context`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["attribute_nodes", "node_times", "parse_trace"]



def node_times(module: nn.Module, example: Any, *, threads: int = 1, runs: int = 200, warmup: int = 20) -> list[dict]:
    """Mean duration (ms) of every node onnxruntime runs for ``module`` on ``example``, in execution
    order: ``[{"name", "op", "ms"}]``, from the per-node profile of ``runs`` inferences."""
    import onnxruntime as ort

    from cost_models.profiling.runner import export_layer_onnx, session_options

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "trace")
        session = ort.InferenceSession(export_layer_onnx(module, example), opts, providers=["CPUExecutionProvider"])
        feeds = {"x": example.detach().cpu().numpy()}
        for _ in range(warmup + runs):
            session.run(None, feeds)
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    per_run = sum(_is_node(e) for e in events) // (warmup + runs)
    return parse_trace(events, skip=per_run * warmup, runs=runs)


def _is_node(e: dict) -> bool:
    return e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")


def parse_trace(events: Sequence[dict], *, skip: int = 0, runs: int | None = None) -> list[dict]:
    """Per-node mean durations (ms) from an onnxruntime profile trace (``"cat": "Node"`` events
    named ``<node>_kernel_time``), in first-execution order. The first ``skip`` node events (warm-up)
    are dropped; ``runs`` (default: the count of the most frequent node) divides the sums."""
    nodes = [e for e in events if _is_node(e)][skip:]
    order: list[str] = []
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    op: dict[str, str] = {}
    for e in nodes:
        name = e["name"][: -len("_kernel_time")]
        if name not in total:
            order.append(name)
            total[name], count[name] = 0.0, 0
            op[name] = str(e.get("args", {}).get("op_name", ""))
        total[name] += float(e["dur"]) / 1e3
        count[name] += 1
    n = runs or max(count.values(), default=1)
    return [{"name": k, "op": op[k], "ms": total[k] / max(n, 1)} for k in order]


def _dotted(node_name: str) -> str:
    """``/blocks/blocks.1/dw/conv/Conv_output_0_nchwc`` → ``blocks.1.dw.conv.Conv_output_0_nchwc``."""
    parts = [p for p in node_name.strip("/").split("/") if p]
    out: list[str] = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return ".".join(out)


def attribute_nodes(nodes: Sequence[dict], layer_names: Sequence[str],
                    linear_names: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Sum node times per layer: ``{layer: {"ms", "nodes"}}`` (layers in ``layer_names``).

    A node named under a layer's module (its conv/Gemm) or under the layer's parent module (its
    activation) is that layer's; a ``Reorder*`` node belongs to the layer before it, unless only
    ``linear_names`` layers follow (then to the next one, the classifier it feeds), and any other
    node (pooling, flatten) to the next layer. Nodes before any layer go to the first one.
    """
    layers = list(layer_names)
    parents = {name: name.rpartition(".")[0] for name in layers}
    owner: list[str | None] = []
    for node in nodes:
        dotted = _dotted(node["name"])
        exact = [n for n in layers if dotted == n or dotted.startswith(n + ".")]
        by_parent = [n for n in layers if parents[n] and dotted.startswith(parents[n] + ".")]
        pick = max(exact, key=len) if exact else (max(by_parent, key=lambda n: len(parents[n])) if by_parent else None)
        owner.append(pick)
    out = {name: {"ms": 0.0, "nodes": 0} for name in layers}
    for i, node in enumerate(nodes):
        name = owner[i]
        if name is None:
            before = next((owner[j] for j in range(i - 1, -1, -1) if owner[j] is not None), None)
            after = next((owner[j] for j in range(i + 1, len(nodes)) if owner[j] is not None), None)
            later_convs = any(owner[j] is not None and owner[j] not in linear_names for j in range(i + 1, len(nodes)))
            if node["op"].startswith("Reorder") and before is not None and (later_convs or after is None):
                name = before
            else:
                name = after or before
        if name is None:
            continue
        out[name]["ms"] += float(node["ms"])
        out[name]["nodes"] += 1
    return out
