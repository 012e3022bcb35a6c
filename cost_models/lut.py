"""Lookup-table cost model: a profile measured on a device, interpolated over channels.

Rows are grouped by *geometry*: kind, kernel, stride, input height × width and batch (and groups
for dense ``conv``). Within a geometry a layer is priced by

* depthwise: linear interpolation in the channel count;
* conv / pwconv / linear: bilinear interpolation in (in_channels, out_channels) on the grid of
  measured channel counts (a cost ∝ cin·cout, i.e. ∝ MACs, is reproduced exactly). Cells of that
  grid that were not measured are filled with the geometry's affine fit in MACs, clamped between
  the measured values with fewer and with more channels.

Both are exact at measured points and monotone non-decreasing in channels wherever the measured
values are. A query outside the measured channel range is extrapolated linearly from the edge of
the grid (the slope of the last measured cell along that axis, i.e. linear in MACs at fixed other
channels; the geometry's cost per MAC where that slope is not positive); a geometry that was not
measured is priced from the nearest measured geometry of the same kind, scaled by the ratio of
MACs. Both warn (:class:`LutExtrapolationWarning`, once per geometry and direction) or, with
``strict=True``, raise ``ValueError``.

The table value of a row is its median minus the profile's measured per-inference overhead of the
runtime (floored at 1 % of the median), since every single-layer measurement paid that overhead
once; :meth:`LookupTableCostModel.total` adds it back once.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cost_models.base import LayerCostModel, register_cost_model
from cost_models.calibration import fit_calibration
from cost_models.context import ContextFit
from cost_models.profile_io import (
    METRICS,
    channel_block,
    depthwise_multiple,
    fitting,
    metric_unit,
    missing_metric_message,
    resolve_profile,
    runtime_overhead,
)
from hwsplit.network.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

#: Floor of a row's value after subtracting the overhead, as a fraction of its median.
NET_FLOOR = 0.01
#: Smallest marginal cost returned (in the model's unit).
MIN_MARGINAL = 1e-9


class LutExtrapolationWarning(UserWarning):
    """A layer was priced outside what the profile measured."""


def geometry_key(spec: LayerSpec) -> tuple:
    """What must match for two layers to share a table: everything but the channel counts."""
    return (spec.kind, spec.kernel, spec.stride, spec.height, spec.width, spec.batch,
            spec.groups if spec.kind == "conv" else 0)


def _describe(geom: tuple) -> str:
    kind, k, s, h, w, b, g = geom
    if kind == "linear":
        return f"linear (batch {b})"
    return f"{kind} k{k} s{s} {h}x{w} (batch {b}{f', groups {g}' if g > 1 else ''})"


class _Table:
    """The measured values of one geometry, completed to a full grid over the measured channels.

    Depthwise tables are a line over ``c``; the others a grid over every measured ``in_channels``
    × every measured ``out_channels``. A cell that was not measured (holes left by an interrupted
    or hand-made profile) is filled with the geometry's affine-in-MACs fit clamped between the
    largest measured value with no more channels and the smallest with no fewer: exact where
    measured, monotone wherever the measurements are.
    """

    def __init__(self, geom: tuple, points: dict[tuple[int, int], float]) -> None:
        self.geom = geom
        self.kind = geom[0]
        self.points = points
        self.depthwise = self.kind == "dwconv"
        macs = np.array([self.macs(ci, co) for ci, co in points], dtype=float)
        vals = np.array(list(points.values()), dtype=float)
        intercept, slope = 0.0, 0.0
        if len(set(macs.tolist())) >= 2:
            slope, intercept = (float(v) for v in np.polyfit(macs, vals, 1))
        if not slope > 0:
            intercept, slope = 0.0, float(np.median(vals / np.maximum(macs, 1.0)))
        self.intercept = intercept
        self.slope = max(slope, 1e-30)  # cost per MAC: hole filling and the marginal prior
        if self.depthwise:
            self.cins = self.couts = sorted(ci for ci, _ in points)
            self.values = np.array([points[(c, c)] for c in self.cins], dtype=float)
            return
        self.cins = sorted({ci for ci, _ in points})
        self.couts = sorted({co for _, co in points})
        grid = np.empty((len(self.cins), len(self.couts)))
        for a, ci in enumerate(self.cins):
            for b, co in enumerate(self.couts):
                grid[a, b] = points[(ci, co)] if (ci, co) in points else self._fill(ci, co)
        self.grid = grid

    def _fill(self, ci: int, co: int) -> float:
        value = self.intercept + self.slope * self.macs(ci, co)
        below = [v for (a, b), v in self.points.items() if a <= ci and b <= co]
        above = [v for (a, b), v in self.points.items() if a >= ci and b >= co]
        if below:
            value = max(value, max(below))
        if above:
            value = min(value, min(above))
        return value

    def macs(self, ci: int, co: int) -> float:
        _, k, s, h, w, b, g = self.geom
        if self.kind == "linear":
            return float(b * ci * co)
        ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        groups = ci if self.depthwise else max(g, 1)
        return float(b * (ci // groups) * k * k * co * ho * wo)

    def box(self) -> tuple[int, int, int, int]:
        return self.cins[0], self.cins[-1], self.couts[0], self.couts[-1]

    def non_monotone(self) -> int:
        """How many neighbouring measured pairs decrease with more channels."""
        if self.depthwise:
            return int(np.sum(np.diff(self.values) < 0))
        bad = 0
        for ci in self.cins:
            line = [self.points[(ci, co)] for co in self.couts if (ci, co) in self.points]
            bad += sum(b < a for a, b in itertools.pairwise(line))
        for co in self.couts:
            line = [self.points[(ci, co)] for ci in self.cins if (ci, co) in self.points]
            bad += sum(b < a for a, b in itertools.pairwise(line))
        return bad

    def inside(self, ci: float, co: float) -> float:
        """Interpolated value at a point inside the measured box."""
        if self.depthwise:
            return float(np.interp(ci, self.cins, self.values))
        a0, a1, t = _bracket(self.cins, ci)
        b0, b1, u = _bracket(self.couts, co)
        g = self.grid
        return float((1 - t) * ((1 - u) * g[a0, b0] + u * g[a0, b1]) + t * ((1 - u) * g[a1, b0] + u * g[a1, b1]))

    def edge_slope(self, axis: int, upper: bool, ci: int, co: int) -> float:
        """Cost per channel along ``axis`` (0: in, 1: out) at the upper/lower edge of the box, at the
        clamped point (ci, co); the per-MAC slope where the table has one value on that axis or the
        measured edge slope is not positive."""
        values = self.cins if axis == 0 else self.couts
        if len(values) >= 2:
            x0, x1 = (values[-2], values[-1]) if upper else (values[0], values[1])
            if self.depthwise:
                v0, v1 = self.inside(x0, x0), self.inside(x1, x1)
            elif axis == 0:
                v0, v1 = self.inside(x0, co), self.inside(x1, co)
            else:
                v0, v1 = self.inside(ci, x0), self.inside(ci, x1)
            slope = (v1 - v0) / (x1 - x0)
            if slope > 0:
                return slope
        if self.depthwise:
            return self.slope * (self.macs(ci + 1, ci + 1) - self.macs(ci, ci))
        step = self.macs(ci + 1, co) - self.macs(ci, co) if axis == 0 else self.macs(ci, co + 1) - self.macs(ci, co)
        return self.slope * step


def _bracket(values: list[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid values around ``x`` and the fraction of the way from the first."""
    j = bisect.bisect_left(values, x)
    if j < len(values) and values[j] == x:
        return j, j, 0.0
    return j - 1, j, (x - values[j - 1]) / (values[j] - values[j - 1])


@register_cost_model("lut")
class LookupTableCostModel(LayerCostModel):
    """Price layers from a measured profile (a path or a loaded dict), interpolated over channels.

    ``metric``: ``"latency_ms"`` (unit ``"ms"``) or ``"energy_mj"`` (unit ``"mJ"``). ``strict``: raise
    ``ValueError`` instead of extrapolating outside the measured grid. ``subtract_overhead``: table
    values are row medians minus the profile's runtime overhead (added back once by ``total``).
    ``calibrate``: when the profile measured whole networks end to end (``networks``), ``total``
    and ``marginal`` are scaled to them (:mod:`cost_models.calibration`); ``layer_cost`` never is.
    ``in_context``: when the profile timed layers inside whole networks (``context``, latency only),
    layers are priced by the in-context fit (:class:`cost_models.context.ContextFit`: channels padded
    to the profile's ``channel_block``, fitted to whole networks' end-to-end times) and ``total``
    adds its memory term and per-network overhead instead of a calibration; the isolated rows remain
    the fallback for kinds the context never saw and the cost-per-MAC prior of the marginals.
    """

    name = "lut"

    def __init__(self, profile: str | os.PathLike[str] | dict[str, Any], metric: str = "latency_ms",
                 strict: bool = False, subtract_overhead: bool = True, calibrate: bool = True,
                 in_context: bool = True) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        self.profile, self.source = resolve_profile(profile)
        self.metric = metric
        self.unit = metric_unit(metric)
        self.strict = bool(strict)
        rows = [r for r in self.profile["rows"] if metric in r]
        if not rows:
            raise ValueError(missing_metric_message(self.source, metric))
        overhead = (self.profile.get("overhead") or {}).get(metric)
        self.overhead = runtime_overhead(self.profile, metric) if overhead and subtract_overhead else 0.0
        if subtract_overhead and overhead is None:
            log.warning("profile %s has no measured overhead for %s; table values are not corrected", self.source,
                        metric)
        points: dict[tuple, dict[tuple[int, int], float]] = {}
        for row in rows:
            spec = LayerSpec.from_dict(row["layer"])
            raw = float(row[metric]["median"])
            value = max(raw - self.overhead, NET_FLOOR * raw) if raw > 0 else 0.0
            points.setdefault(geometry_key(spec), {})[(spec.in_channels, spec.out_channels)] = value
        with fitting(self.source, "the lookup table"):
            self.tables = {g: _Table(g, p) for g, p in points.items()}
        bad = sum(t.non_monotone() for t in self.tables.values())
        if bad:
            log.info("profile %s: %d neighbouring %s values decrease with more channels (measurement noise); "
                     "marginal costs there fall back to the cost-per-MAC slope", self.source, bad, metric)
        self._cache: dict[tuple, float] = {}
        self._warned: set[tuple] = set()
        self.context: ContextFit | None = None
        context_nets = (self.profile.get("context") or {}).get("networks") or []
        if in_context and metric == "latency_ms" and context_nets:
            self.context = ContextFit.of(context_nets, block=channel_block(self.profile),
                                         dw_multiple=depthwise_multiple(self.profile))
            self.overhead = self.context.overhead_network_ms
        elif calibrate and self.profile.get("networks"):
            with fitting(self.source, "the whole-network calibration"):
                self.calibration = fit_calibration(self, self.profile["networks"], metric)

    # -- pricing ------------------------------------------------------------------------------------
    def _extrapolating(self, key: tuple, message: str) -> None:
        if self.strict:
            raise ValueError(f"{message} (profile {self.source}; strict=True, so no extrapolation)")
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{message}; extrapolating from the edge of the measured grid (profile {self.source})",
                          LutExtrapolationWarning, stacklevel=4)

    def network_term(self, specs: Sequence[LayerSpec]) -> float:
        """The in-context fit's memory term (weights beyond the cache, ms); 0 without a context."""
        return self.context.memory_ms(specs) if self.context is not None else 0.0

    def _price(self, spec: LayerSpec) -> float:
        if self.context is not None and self.context.has(spec):
            return max(self.context.predict(spec), MIN_MARGINAL)
        geom = geometry_key(spec)
        table = self.tables.get(geom)
        if table is None:
            table = self._nearest_table(spec)
            self._extrapolating(("geometry",) + geom,
                                f"{_describe(geom)} was not measured: priced from {_describe(table.geom)}")
            proxy = LayerSpec(kind=spec.kind, in_channels=spec.in_channels, out_channels=spec.out_channels,
                              kernel=table.geom[1], stride=table.geom[2], height=table.geom[3],
                              width=table.geom[4], batch=table.geom[5],
                              groups=spec.in_channels if spec.kind == "dwconv" else max(table.geom[6], 1))
            ratio = spec.macs / proxy.macs if proxy.macs > 0 else 1.0
            return self._in_table(table, spec.in_channels, spec.out_channels) * ratio
        return self._in_table(table, spec.in_channels, spec.out_channels)

    def _in_table(self, table: _Table, ci: int, co: int) -> float:
        lo_i, hi_i, lo_o, hi_o = table.box()
        if table.depthwise:
            co, lo_o, hi_o = ci, lo_i, hi_i
        cci, cco = min(max(ci, lo_i), hi_i), min(max(co, lo_o), hi_o)
        value = table.inside(cci, cco)
        if (cci, cco) == (ci, co):
            return value
        fields = [("in_channels", ci, cci, lo_i, hi_i, 0)]
        if not table.depthwise:
            fields.append(("out_channels", co, cco, lo_o, hi_o, 1))
        extrapolated = value
        slopes = {}
        for field, q, clamped, lo, hi, axis in fields:
            if q == clamped:
                continue
            where = "above the measured maximum" if q > hi else "below the measured minimum"
            self._extrapolating(("above" if q > hi else "below", field) + table.geom,
                                f"{_describe(table.geom)}: {field}={q} {where} {hi if q > hi else lo}")
            slopes[axis] = table.edge_slope(axis, q > hi, cci, cco)
            extrapolated += slopes[axis] * (q - clamped)
        if len(slopes) == 2 and ci > hi_i and co > hi_o and len(table.cins) >= 2 and len(table.couts) >= 2:
            # bilinear beyond the corner: the corner cell's cross term (cost ∝ cin·cout grows faster)
            i0, i1, o0, o1 = table.cins[-2], table.cins[-1], table.couts[-2], table.couts[-1]
            cross = (table.inside(i1, o1) - table.inside(i0, o1) - table.inside(i1, o0) + table.inside(i0, o0))
            extrapolated += max(cross, 0.0) / ((i1 - i0) * (o1 - o0)) * (ci - hi_i) * (co - hi_o)
        return max(extrapolated, NET_FLOOR * value)

    def _nearest_table(self, spec: LayerSpec) -> _Table:
        candidates = [t for t in self.tables.values() if t.kind == spec.kind
                      and (spec.kind != "conv" or (t.geom[6] > 1) == (spec.groups > 1))]
        if not candidates:
            raise ValueError(f"profile {self.source} has no {spec.kind} rows"
                             f"{' with groups' if spec.kind == 'conv' and spec.groups > 1 else ''}: "
                             f"cannot price layer {spec.name or spec.key()}")
        pixels = math.log(spec.height * spec.width * spec.batch)

        def distance(t: _Table) -> tuple:
            _, k, s, h, w, b, _ = t.geom
            return (k != spec.kernel, s != spec.stride, abs(math.log(h * w * b) - pixels), b != spec.batch)

        return min(candidates, key=distance)

    # -- totals and marginals -------------------------------------------------------------------
    def slope(self, spec: LayerSpec) -> float:
        """Cost per MAC of ``spec``'s geometry (least-squares fit over its measured rows)."""
        table = self.tables.get(geometry_key(spec))
        if table is None:
            try:
                table = self._nearest_table(spec)
            except ValueError:
                return float(np.median([t.slope for t in self.tables.values()]))
        return table.slope

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...], *,
                 groups: list | None = None) -> dict[str, float]:
        """Cost of one more channel per neuron group (base class), always > 0: where the table is
        not monotone (measurement noise), the per-geometry cost-per-MAC slope prices it instead."""
        out = super().marginal(model, input_shape, groups=groups)
        return positive_marginals(self, out, model, input_shape, groups=groups)


class _SlopeModel(LayerCostModel):
    """Cost ∝ MACs with the per-geometry slope of a table-like model (a smooth, positive prior)."""

    def __init__(self, slope_of: Any) -> None:
        self.slope_of = slope_of

    def layer_cost(self, spec: LayerSpec) -> float:
        return self.slope_of(spec) * spec.macs


def positive_marginals(model: Any, out: dict[str, float], net: nn.Module, input_shape: tuple[int, ...], *,
                       groups: list | None = None) -> dict[str, float]:
    """Replace non-positive marginals by the smooth MACs prior (``model.slope(spec)`` per layer)."""
    bad = [name for name, value in out.items() if not value > MIN_MARGINAL]
    if not bad:
        return out
    prior = _SlopeModel(model.slope).marginal(net, input_shape, groups=groups)
    scale = model.calibration.scale
    for name in bad:
        out[name] = max(scale * prior.get(name, 0.0), MIN_MARGINAL)
    log.info("%s: %d of %d neuron groups had a non-positive marginal %s (non-monotone measurements); "
             "priced them by cost per MAC instead", model.name, len(bad), len(out), getattr(model, "metric", ""))
    return out

