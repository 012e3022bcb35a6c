"""Layers priced in context: a per-layer model fitted to whole networks (docs/design.md §6).

A layer exported and timed alone pays reorders and runs cache-hot; inside a network it does
neither. The profile's ``context`` section holds random networks of the family, each timed end to
end (the clean figure) and node by node (:mod:`cost_models.profiling.node_trace`; the profiler lengthens
every node by a few µs, which swamps the small layers of an aligned network). :class:`ContextFit`
uses each for what it measures well, in two steps:

1. *shape* from the node traces: per *geometry* (kind, kernel, stride, input size) a non-negative
   least-squares fit of the traced layer times on the terms the device responds to
   (:data:`SLOPE_TERMS`, from :func:`device_terms`: MACs over channels padded to the backend's
   block where the kernel is blocked, unpadded MACs where it falls back, output elements, the
   reorder a layer causes, input elements) plus a free intercept per blocked/plain kernel. Only
   the slopes are kept (``base(layer)``); the intercepts absorb the profiler's per-node cost.
2. *level* from the end-to-end times: per layer group g (kind × blocked kernel or not) a scale
   s_g and a constant κ_g (ms per layer), one cost per output element beyond A₀ in a layer (feature
   maps that leave the cache), one cost per weight element beyond W₀ in the network (the weights
   that no longer stay in the cache stream from memory at every inference) and a per-network
   constant o_net, by non-negative least squares in relative error:

       end to end (ms)  =  Σ_layers [ s_g · base + κ_g + μ · max(0, out − A₀) ]
                           + λ · max(0, Σ weights − W₀)  +  o_net

   W₀ and A₀ are chosen among :data:`MEMORY_THRESHOLDS` and :data:`ACTIVATION_THRESHOLDS` (or
   without the term) by leave-one-network-out error on the context networks (W₀, then A₀, then W₀
   again): nothing about the CPU's caches is hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwsplit.network.specs import LayerSpec

log = logging.getLogger(__name__)

__all__ = ["ACTIVATION_THRESHOLDS", "DEVICE_TERMS", "GROUPS", "MEMORY_THRESHOLDS", "SLOPE_TERMS", "ContextFit",
           "Layer", "NetworkFit", "device_terms", "fit_network", "geometry", "padded", "weight_elems"]

#: Layer groups with a scale of their own in the end-to-end fit: kind × blocked kernel or not.
GROUPS = ("conv/blocked", "conv/plain", "dwconv/blocked", "dwconv/plain", "pwconv/blocked", "pwconv/plain",
          "linear/plain")
#: Names of :func:`device_terms`' columns.
DEVICE_TERMS = ("blocked", "unblocked", "padded_macs", "unblocked_macs", "padded_out_elems", "unblocked_out_elems",
                "reorder_elems", "in_elems")
#: The columns of :func:`device_terms` a layer's traced time is fitted on per geometry (step 1).
SLOPE_TERMS = ("padded_macs", "unblocked_macs", "padded_out_elems", "unblocked_out_elems", "reorder_elems", "in_elems")
#: Candidate thresholds W₀ (weight elements) of the memory term (step 2): 16k to 4M, ×√2 apart.
MEMORY_THRESHOLDS = tuple(int(round(2 ** (k / 2))) for k in range(28, 45))
#: Candidate thresholds A₀ (output elements of one layer) of the activation term (step 2): 0, 1k to 64k.
ACTIVATION_THRESHOLDS = (0, *(2 ** k for k in range(10, 17)))


def padded(channels: int, block: int) -> int:
    """``channels`` rounded up to a multiple of ``block`` (what a blocked kernel computes)."""
    return int(math.ceil(channels / block) * block) if block > 1 else int(channels)


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


def weight_elems(spec: LayerSpec, block: int = 1, dw_multiple: int = 0) -> float:
    """Weight elements the kernel reads per inference: channels padded to ``block`` where it runs
    blocked (as onnxruntime stores them), the layer's own where it falls back."""
    k2 = spec.kernel * spec.kernel
    if spec.kind == "linear":
        return float(spec.in_channels * spec.out_channels)
    if not _blocked_input(spec, block, dw_multiple):
        return float(spec.in_channels // max(spec.groups, 1) * spec.out_channels * k2)
    if spec.kind == "dwconv":
        return float(padded(spec.in_channels, block) * k2)
    ci = spec.in_channels if spec.in_channels <= 3 else padded(spec.in_channels, block)
    return float(ci // max(spec.groups, 1) * padded(spec.out_channels, block) * k2)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------

def _slope_row(spec: LayerSpec, block: int, dw_multiple: int) -> list[float]:
    terms = dict(zip(DEVICE_TERMS, device_terms(spec, block, dw_multiple)))
    return [terms[t] for t in SLOPE_TERMS]


def _fit_slopes(rows: Sequence[tuple[LayerSpec, float]], block: int, dw_multiple: int) -> list[float]:
    """Step 1 for one geometry: non-negative slopes on :data:`SLOPE_TERMS` of traced times (ms),
    with a free-sign intercept per blocked/plain kernel that is fitted and dropped."""
    from scipy.optimize import nnls

    x, y = [], []
    for spec, ms in rows:
        b = 1.0 if _blocked_input(spec, block, dw_multiple) else 0.0
        x.append(_slope_row(spec, block, dw_multiple) + [b, 1.0 - b, -b, b - 1.0])
        y.append(ms)
    a = np.asarray(x, dtype=float)
    scale = np.max(np.abs(a), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    coef, _ = nnls(a / scale, np.asarray(y, dtype=float))
    return (coef / scale)[: len(SLOPE_TERMS)].tolist()


@dataclass
class NetworkFit:
    """Step 2: how layers' base costs add up to a network's end-to-end time (module docstring).

    ``scale`` and ``constant_ms`` per :data:`GROUPS` (s_g, κ_g), ``per_output_ms`` (μ, ms per output
    element of a layer beyond ``output_threshold_elems`` A₀), ``per_weight_ms`` (λ, ms per weight
    element of the network beyond ``threshold_elems`` W₀; each 0 without its term) and
    ``overhead_network_ms`` (o_net). ``loo_mape``: the leave-one-network-out mean absolute relative
    error that chose W₀ and A₀ (None when too few networks to fit, then the identity).
    """

    scale: dict[str, float] = field(default_factory=lambda: {g: 1.0 for g in GROUPS})
    constant_ms: dict[str, float] = field(default_factory=lambda: {g: 0.0 for g in GROUPS})
    per_weight_ms: float = 0.0
    threshold_elems: float = math.inf
    per_output_ms: float = 0.0
    output_threshold_elems: float = math.inf
    overhead_network_ms: float = 0.0
    loo_mape: float | None = None

    def layer_ms(self, group: str, base_ms: float, out_elems: float = 0.0) -> float:
        """s_g · base + κ_g + μ · max(0, out_elems − A₀) (ms)."""
        spill = self.per_output_ms * max(0.0, out_elems - self.output_threshold_elems) if self.per_output_ms else 0.0
        return self.scale.get(group, 1.0) * base_ms + self.constant_ms.get(group, 0.0) + spill

    def memory_ms(self, weights: float) -> float:
        """λ · max(0, weights − W₀) (ms): the cost of the weights that spill out of the cache."""
        return self.per_weight_ms * max(0.0, weights - self.threshold_elems) if self.per_weight_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"scale": dict(self.scale), "constant_ms": dict(self.constant_ms), "per_weight_ms": self.per_weight_ms,
                "threshold_elems": None if math.isinf(self.threshold_elems) else self.threshold_elems,
                "per_output_ms": self.per_output_ms,
                "output_threshold_elems": (None if math.isinf(self.output_threshold_elems)
                                           else self.output_threshold_elems),
                "overhead_network_ms": self.overhead_network_ms, "loo_mape": self.loo_mape}


Layer = tuple[str, float, float, float]
"""One layer in step 2: (group, base ms, weight elements, output elements)."""


def _design(layers: Sequence[Sequence[Layer]], w0: float, a0: float) -> np.ndarray:
    """Columns: Σ base and layer count per group, output spill, weight spill, 1 (one row per network)."""
    n = len(GROUPS)
    a = np.zeros((len(layers), 2 * n + 3))
    for i, net in enumerate(layers):
        for group, base, _, out in net:
            j = GROUPS.index(group)
            a[i, j] += base
            a[i, n + j] += 1.0
            if math.isfinite(a0):
                a[i, -3] += max(0.0, out - a0)
        if math.isfinite(w0):
            a[i, -2] = max(0.0, sum(w for _, _, w, _ in net) - w0)
        a[i, -1] = 1.0
    return a


def _solve(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``a @ c ≈ y`` in relative error (rows weighted by 1/y)."""
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(y, 1e-12)
    scale = np.max(np.abs(a), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    coef, _ = nnls((a / scale) * w[:, None], y * w)
    return coef / scale


def _loo_mape(a: np.ndarray, y: np.ndarray) -> float:
    errors = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        errors.append(abs(float(a[i] @ _solve(a[keep], y[keep])) / y[i] - 1.0))
    return float(np.mean(errors))


def fit_network(layers: Sequence[Sequence[Layer]], y_ms: Sequence[float], *,
                thresholds: Sequence[float] = MEMORY_THRESHOLDS,
                output_thresholds: Sequence[float] = ACTIVATION_THRESHOLDS) -> NetworkFit:
    """Step 2 on networks given as ``[(group, base_ms, weight_elems, out_elems) per layer]`` with
    end-to-end times ``y_ms``: W₀, then A₀, then W₀ again (each possibly without its term) by
    leave-one-network-out MAPE, then the coefficients on all networks. Fewer networks than twice
    the fitted columns: the identity (scales 1, no constants)."""
    y = np.asarray(y_ms, dtype=float)
    used = np.any(_design(layers, math.inf, math.inf)[:, : 2 * len(GROUPS)] > 0, axis=0)
    if len(y) < 2 * (int(used.sum()) + 3):
        return NetworkFit()
    w_grid = [math.inf, *sorted(float(t) for t in thresholds)]
    a_grid = [math.inf, *sorted(float(t) for t in output_thresholds)]
    w0, a0, mape = math.inf, math.inf, math.inf
    for axis in ("w", "a", "w"):
        for candidate in (w_grid if axis == "w" else a_grid):
            trial = (candidate, a0) if axis == "w" else (w0, candidate)
            m = _loo_mape(_design(layers, *trial), y)
            if m < mape - 1e-9:
                mape, (w0, a0) = m, trial
    coef = _solve(_design(layers, w0, a0), y)
    n = len(GROUPS)
    return NetworkFit(scale={g: float(coef[j]) if used[j] else 1.0 for j, g in enumerate(GROUPS)},
                      constant_ms={g: float(coef[n + j]) for j, g in enumerate(GROUPS)},
                      per_output_ms=float(coef[-3]) if math.isfinite(a0) else 0.0, output_threshold_elems=a0,
                      per_weight_ms=float(coef[-2]) if math.isfinite(w0) else 0.0, threshold_elems=w0,
                      overhead_network_ms=float(coef[-1]), loo_mape=mape)


_FITS: dict[tuple, ContextFit] = {}


class ContextFit:
    """The in-context layer model of a profile (module docstring): :meth:`predict` prices a layer,
    :meth:`memory_ms` the network's weights beyond the cache, ``overhead_network_ms`` the rest.

    ``networks``: the profile's ``context["networks"]`` entries (``latency_ms`` end to end,
    ``layers`` with per-layer traced ``latency_ms`` and ``nodes``); ``block``, ``dw_multiple``: the
    backend's channel block and depthwise granularity (:mod:`cost_models.profiling.channel_block`). Plain numbers
    only (``to_dict``), so a profile never holds a pickle.
    """

    def __init__(self, networks: Sequence[dict[str, Any]], *, block: int = 1, dw_multiple: int = 0) -> None:
        self.block, self.dw_multiple = int(block), int(dw_multiple)
        self.nets = [n for n in networks if n.get("layers")]
        if not self.nets:
            raise ValueError("context: no network with per-layer times to fit")
        # what the end-to-end times do not explain by the traced node sums, per node (negative where the
        # profiler's own cost per node dominates): the per-layer targets of a regressor fitted on the traces
        y = np.array([float(n["latency_ms"]["median"]) for n in self.nets])
        sums = np.array([sum(float(x["latency_ms"]) for x in n["layers"]) for n in self.nets])
        counts = np.array([sum(int(x["nodes"]) for x in n["layers"]) for n in self.nets], dtype=float)
        self.overhead_node_ms = float(np.median((y - sums) / counts))
        # 1. shape: slopes per geometry (and per kind, for geometries with too few layers)
        samples: dict[tuple, list[tuple[LayerSpec, float]]] = {}
        kinds: dict[str, list[tuple[LayerSpec, float]]] = {}
        for n in self.nets:
            for x in n["layers"]:
                spec = LayerSpec.from_dict(x["layer"])
                samples.setdefault(geometry(spec), []).append((spec, float(x["latency_ms"])))
                kinds.setdefault(spec.kind, []).append((spec, float(x["latency_ms"])))
        minimum = 2 * (len(SLOPE_TERMS) + 4)
        self.coef = {g: _fit_slopes(rows, self.block, self.dw_multiple)
                     for g, rows in samples.items() if len(rows) >= minimum}
        self.kind_coef = {k: _fit_slopes(rows, self.block, self.dw_multiple) for k, rows in kinds.items()}
        # 2. level: scales, constants, memory term and o_net on the end-to-end times
        self.network = self.fit_network(self.nets, self._base)
        self.networks = len(self.nets)
        log.info("in-context fit on %d networks: %d geometries, %+.4f ms per network, weights beyond %s elements "
                 "at %.3g ms each, outputs beyond %s elements at %.3g ms each, scales %s (leave-one-out error %s)",
                 len(self.nets), len(self.coef), self.network.overhead_network_ms, self.network.threshold_elems,
                 self.network.per_weight_ms, self.network.output_threshold_elems, self.network.per_output_ms,
                 {g: round(v, 3) for g, v in self.network.scale.items()},
                 f"{100 * self.network.loo_mape:.1f} %" if self.network.loo_mape is not None else "n/a")

    @classmethod
    def of(cls, networks: Sequence[dict[str, Any]], *, block: int = 1, dw_multiple: int = 0) -> ContextFit:
        """The fit of ``networks``, memoised on their content (a profile's fit is the same every time it is
        loaded; the leave-one-out choice of W₀ and A₀ costs about a second)."""
        key = (hashlib.sha1(json.dumps(networks, sort_keys=True).encode()).hexdigest(), int(block), int(dw_multiple))
        if key not in _FITS:
            _FITS[key] = cls(networks, block=block, dw_multiple=dw_multiple)
        return _FITS[key]

    @property
    def overhead_network_ms(self) -> float:
        return self.network.overhead_network_ms

    def has(self, spec: LayerSpec) -> bool:
        return geometry(spec) in self.coef or spec.kind in self.kind_coef

    def group(self, spec: LayerSpec) -> str:
        return f"{spec.kind}/{'blocked' if _blocked_input(spec, self.block, self.dw_multiple) else 'plain'}"

    def weights(self, spec: LayerSpec) -> float:
        return weight_elems(spec, self.block, self.dw_multiple)

    def outputs(self, spec: LayerSpec) -> float:
        """Output elements a convolution writes (the activation term's variable): channels padded to the
        block where the kernel is blocked; 0 for the classifier."""
        if spec.kind == "linear":
            return 0.0
        blocked = _blocked_input(spec, self.block, self.dw_multiple)
        channels = padded(spec.out_channels, self.block) if blocked else spec.out_channels
        return float(spec.batch * channels * spec.out_height * spec.out_width)

    def fit_network(self, nets: Sequence[dict[str, Any]], base: Callable[[LayerSpec], float]) -> NetworkFit:
        """Step 2 for any per-layer ``base`` (ms; the table's slopes or a regressor) on ``nets``."""
        layers = []
        for n in nets:
            specs = [LayerSpec.from_dict(x["layer"]) for x in n["layers"]]
            layers.append([(self.group(s), base(s), self.weights(s), self.outputs(s)) for s in specs])
        return fit_network(layers, [float(n["latency_ms"]["median"]) for n in nets])

    def _base(self, spec: LayerSpec) -> float:
        coef = self.coef.get(geometry(spec)) or self.kind_coef[spec.kind]
        return float(np.dot(coef, _slope_row(spec, self.block, self.dw_multiple)))

    def predict(self, spec: LayerSpec) -> float:
        """In-context time of ``spec`` (ms): s_g · base(spec) + κ_g + μ · max(0, out − A₀)."""
        return self.network.layer_ms(self.group(spec), self._base(spec), self.outputs(spec))

    def memory_ms(self, specs: Sequence[LayerSpec]) -> float:
        """The network's memory term (ms) for its layers ``specs``."""
        return self.network.memory_ms(sum(self.weights(s) for s in specs))

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "dw_multiple": self.dw_multiple, "networks": self.networks,
                "geometries": len(self.coef), "terms": list(SLOPE_TERMS), "overhead_node_ms": self.overhead_node_ms,
                **self.network.to_dict()}
