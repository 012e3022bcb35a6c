"""Layers timed in context: per-node onnxruntime profiles of whole networks (docs/design.md §6).

A layer exported and timed alone pays reorders and runs cache-hot; inside a network it does
neither. :func:`node_times` runs a whole network with onnxruntime's per-node profiling
(``SessionOptions.enable_profiling``; the JSON trace has one ``"cat": "Node"`` event per node and
run, with its duration in µs), :func:`attribute_nodes` maps every node back to a layer of the
network (a conv's fused activation to its conv, a ``Reorder*`` node to the layer before it,
pooling and the last reorder to the classifier), and :class:`ContextFit` fits

    end to end  =  Σ_layers s_g(layer) · t(layer)  +  o_net,   t ≈ Σ its nodes + o_node · its node count

in three steps: o_node (ms per node; the median over networks of (end to end − Σ nodes) / nodes,
negative where the profiler's own cost per node dominates); t per *geometry* (kind, kernel,
stride, input size) by non-negative least squares (relative errors) on terms the device responds
to (:func:`device_terms`): MACs over channels padded to the backend's block where the kernel is
blocked, unpadded MACs where it falls back, output elements, and the reorder a layer causes; then
one scale s_g per (kind, blocked or not) and o_net (ms per network) by bounded least squares in
relative error on the networks' end-to-end times (the per-kind residual fit).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cost_models.blocks import padded
from hwsplit.network.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DEVICE_TERMS", "ContextFit", "attribute_nodes", "device_terms", "geometry", "node_times"]

#: Layer groups with a scale of their own in the end-to-end fit: kind × blocked kernel or not.
GROUPS = ("conv/blocked", "conv/plain", "dwconv/blocked", "dwconv/plain", "pwconv/blocked", "pwconv/plain",
          "linear/plain")
#: Names of :func:`device_terms`' columns.
DEVICE_TERMS = ("blocked", "unblocked", "padded_macs", "unblocked_macs", "padded_out_elems", "unblocked_out_elems",
                "reorder_elems", "in_elems")


def _blocked_input(spec: LayerSpec, block: int, dw_multiple: int) -> bool:
    """Whether the backend runs ``spec`` with a blocked (NCHWc) kernel: its input channels must be
    a multiple of the depthwise granularity (dense convs over ≤ 3 input channels read plain NCHW)."""
    if block <= 1 or spec.kind == "linear":
        return False
    if dw_multiple <= 0:
        return spec.kind != "dwconv" and spec.in_channels <= 3
    return spec.in_channels % dw_multiple == 0 or (spec.kind == "conv" and spec.in_channels <= 3)


def device_terms(spec: LayerSpec, block: int = 1, dw_multiple: int = 0) -> list[float]:
    """Terms (:data:`DEVICE_TERMS`) a layer's in-context time is linear in on a blocked backend.

    ``blocked`` layers compute padded channels (``ceil(c / block) · block``); the others the channels
    they have. A blocked layer whose output channels are not a multiple of ``dw_multiple`` is
    followed by a ReorderOutput (the next depthwise conv falls back), an unblocked one whose are
    by a ReorderInput: ``reorder_elems`` is that reorder's output size.
    """
    b = 1.0 if _blocked_input(spec, block, dw_multiple) else 0.0
    pix_out = spec.batch * spec.out_height * spec.out_width
    pix_in = spec.batch * spec.height * spec.width
    ci, co, k2 = spec.in_channels, spec.out_channels, spec.kernel * spec.kernel
    if spec.kind == "dwconv":
        pmacs, macs = padded(ci, block) * k2 * pix_out, ci * k2 * pix_out
        reorder = 0.0
    elif spec.kind == "linear":
        pmacs, macs = 0.0, float(spec.macs)
        last_blocked = block > 1 and dw_multiple > 0 and ci % dw_multiple == 0
        reorder = float(ci) if last_blocked else 0.0  # the ReorderOutput before pooling
    else:
        pci = ci if ci <= 3 else padded(ci, block)
        pmacs, macs = pci * padded(co, block) * k2 * pix_out, ci * co * k2 * pix_out
        out_blocked = block > 1 and dw_multiple > 0 and co % dw_multiple == 0
        reorder = float(co * pix_out) if (b > 0) != out_blocked else 0.0
    return [b, 1.0 - b, b * pmacs, (1 - b) * macs, b * padded(co, block) * pix_out, (1 - b) * co * pix_out,
            reorder, float(ci * pix_in)]


def geometry(spec: LayerSpec) -> tuple:
    """What two layers must share to share a fit: everything but the channel counts."""
    return (spec.kind, spec.kernel, spec.stride, spec.height, spec.width, spec.batch)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def node_times(module: nn.Module, example: Any, *, threads: int = 1, runs: int = 200, warmup: int = 20) -> list[dict]:
    """Mean duration (ms) of every node onnxruntime runs for ``module`` on ``example``, in execution
    order: ``[{"name", "op", "ms"}]``, from the per-node profile of ``runs`` inferences."""
    import onnxruntime as ort

    from cost_models.runner import export_layer_onnx, session_options

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


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------

def _nnls_relative(T: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``T @ c ≈ y`` in relative error (rows weighted by 1/y)."""
    from scipy.optimize import nnls

    scale = np.max(np.abs(T), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    w = 1.0 / np.maximum(y, 1e-12)
    coef, _ = nnls((T / scale) * w[:, None], y * w)
    return coef / scale


class ContextFit:
    """Per-geometry in-context layer times plus per-node / per-network overhead (module docstring).

    ``networks``: the profile's ``context["networks"]`` entries (``latency_ms`` end to end,
    ``layers`` with per-layer ``latency_ms`` and ``nodes``); ``block``, ``dw_multiple``: the
    backend's channel block and depthwise granularity (:mod:`cost_models.blocks`). Plain numbers
    only (``to_dict``), so a profile never holds a pickle.
    """

    def __init__(self, networks: Sequence[dict[str, Any]], *, block: int = 1, dw_multiple: int = 0) -> None:
        self.block, self.dw_multiple = int(block), int(dw_multiple)
        nets = [n for n in networks if n.get("layers")]
        if not nets:
            raise ValueError("context: no network with per-layer times to fit")
        # 1. per-node overhead: what the networks' end-to-end time does not explain by their node sums
        #    (negative here: per-node profiling lengthens every node it times)
        y = np.array([float(n["latency_ms"]["median"]) for n in nets])
        sums = np.array([sum(float(x["latency_ms"]) for x in n["layers"]) for n in nets])
        counts = np.array([sum(int(x["nodes"]) for x in n["layers"]) for n in nets], dtype=float)
        self.overhead_node_ms = float(np.median((y - sums) / counts))
        samples: dict[tuple, list[tuple[list[float], float]]] = {}
        kinds: dict[str, list[tuple[list[float], float]]] = {}
        for n in nets:
            for x in n["layers"]:
                spec = LayerSpec.from_dict(x["layer"])
                t = float(x["latency_ms"]) + self.overhead_node_ms * int(x["nodes"])
                row = (device_terms(spec, self.block, self.dw_multiple), max(t, 1e-4))
                samples.setdefault(geometry(spec), []).append(row)
                kinds.setdefault(spec.kind, []).append(row)
        self.coef = {g: _nnls_relative(np.array([r for r, _ in rows]), np.array([y for _, y in rows])).tolist()
                     for g, rows in samples.items() if len(rows) >= 2 * len(DEVICE_TERMS)}
        self.kind_coef = {k: _nnls_relative(np.array([r for r, _ in rows]), np.array([y for _, y in rows])).tolist()
                          for k, rows in kinds.items()}
        # 3. per-(kind, blocked) scale and per-network overhead on the end-to-end times
        self.group_scale, self.overhead_network_ms = self.fit_scales(nets, self._base)
        self.networks = len(nets)
        log.info("in-context fit on %d networks: %d geometries, %+.5f ms per node, %+.4f ms per network, "
                 "scales %s", len(nets), len(self.coef), self.overhead_node_ms, self.overhead_network_ms,
                 {g: round(v, 3) for g, v in self.group_scale.items()})

    def has(self, spec: LayerSpec) -> bool:
        return geometry(spec) in self.coef or spec.kind in self.kind_coef

    def fit_scales(self, nets: Sequence[dict[str, Any]], base: Any) -> tuple[dict[str, float], float]:
        """Scales s_g per :data:`GROUPS` (bounded to [0.25, 4]: no layer kind is free or 4× off) and
        o_net (ms) with end to end = Σ_g s_g · Σ_{layers in g} base(layer) + o_net, least squares in
        relative error over ``nets``. Too few networks: scales 1, o_net 0."""
        from scipy.optimize import lsq_linear

        scales, o_net = {g: 1.0 for g in GROUPS}, 0.0
        if len(nets) < 2 * (len(GROUPS) + 1):
            return scales, o_net
        y = np.array([float(n["latency_ms"]["median"]) for n in nets])
        a = np.zeros((len(nets), len(GROUPS) + 1))
        for i, n in enumerate(nets):
            for x in n["layers"]:
                spec = LayerSpec.from_dict(x["layer"])
                a[i, GROUPS.index(self.group(spec))] += base(spec)
            a[i, -1] = 1.0
        used = np.any(a[:, :-1] > 0, axis=0)
        lower = np.append(np.where(used, 0.25, 1.0 - 1e-9), -np.inf)
        upper = np.append(np.where(used, 4.0, 1.0 + 1e-9), np.inf)
        res = lsq_linear(a / y[:, None], np.ones_like(y), bounds=(lower, upper))
        return {g: float(v) for g, v in zip(GROUPS, res.x[:-1])}, float(res.x[-1])

    def group(self, spec: LayerSpec) -> str:
        return f"{spec.kind}/{'blocked' if _blocked_input(spec, self.block, self.dw_multiple) else 'plain'}"

    def _base(self, spec: LayerSpec) -> float:
        coef = self.coef.get(geometry(spec)) or self.kind_coef[spec.kind]
        return float(np.dot(coef, device_terms(spec, self.block, self.dw_multiple)))

    def predict(self, spec: LayerSpec) -> float:
        """In-context time of ``spec`` (ms): the geometry's fit times its (kind, blocked) scale."""
        return self.group_scale.get(self.group(spec), 1.0) * self._base(spec)

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "dw_multiple": self.dw_multiple, "networks": self.networks,
                "group_scale": dict(self.group_scale),
                "overhead_network_ms": self.overhead_network_ms, "overhead_node_ms": self.overhead_node_ms,
                "geometries": len(self.coef), "terms": list(DEVICE_TERMS)}

