"""Regression of a measured per-layer metric (NVML energy or latency) from layer features.

:class:`LayerRegressor` is a scikit-learn estimator. Per layer kind it fits a *non-negative* linear
model of physically additive terms::

    cost ≈ b0 + b1·MACs + b2·input elements + b3·output elements + b4·weights + b5·output pixels

(batch included), by bounded least squares on *relative* residuals (each row weighted by 1 / its
value, so small and large layers count alike) with a small ridge penalty on standardised columns.
Every term grows with the channel count and every coefficient is ≥ 0, the MACs coefficient
strictly > 0, so the predicted cost is smooth and strictly increasing in channels: the marginal cost
of one more channel is always positive, and larger at higher resolution (more MACs and elements
per channel). A tree ensemble would fit the table more closely but its finite differences are
mostly zero, which the knapsack cannot use.

Nothing is pickled: :class:`EnergyPredictorCostModel` refits the regressor from its profile
deterministically (the fit has no randomness), and ``coefficients()`` gives the fitted numbers as a
plain dict.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from cost_models.base import LayerCostModel
from cost_models.calibration import fit_calibration
from cost_models.context import DEVICE_TERMS, ContextFit, NetworkFit, device_terms
from cost_models.lut import NET_FLOOR, positive_marginals
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
from hwsplit.network.specs import LAYER_KINDS, LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

#: (context fit, regressor options) -> (fitted regressor, end-to-end fit): a profile's in-context fit is the same
#: every time it is loaded (see ContextFit.of)
_IN_CONTEXT: dict[tuple, tuple[LayerRegressor, NetworkFit]] = {}


def _in_context(context: ContextFit, networks: Sequence[dict[str, Any]], source: str,
                options: dict[str, Any]) -> tuple[LayerRegressor, NetworkFit]:
    """The regressor fitted to ``context``'s in-context per-layer targets (ms) and the end-to-end fit of
    ``networks`` on its layer times, memoised on the fit and the regressor's options."""
    options = {"channel_block": context.block, "depthwise_multiple": context.dw_multiple, **options}
    key = (context, repr(sorted(options.items())))
    if key not in _IN_CONTEXT:
        specs, y = context_targets(networks, context.overhead_node_ms)
        with fitting(source, "the layer-cost regressor"):
            regressor = LayerRegressor(**options).fit(specs, y)
        raw: dict[tuple, float] = {}

        def base(spec: LayerSpec) -> float:
            if spec.key() not in raw:
                raw[spec.key()] = float(regressor.predict([spec])[0])
            return raw[spec.key()]

        _IN_CONTEXT[key] = (regressor, context.fit_network(networks, base))
    return _IN_CONTEXT[key]

#: Columns of the per-kind linear model (all non-decreasing in channels).
TERMS = ("one", "macs", "in_elems", "out_elems", "weights", "out_pixels",
         # what a blocked backend responds to (docs/design.md §6; zero without a channel block):
         "blocked", "padded_macs", "unblocked_macs", "padded_out_elems", "reorder_elems")
#: Column order of a numeric array accepted by :meth:`LayerRegressor.fit` in place of LayerSpecs.
SPEC_COLUMNS = ("kind", "in_channels", "out_channels", "kernel", "stride", "groups", "height", "width", "batch")


def _as_specs(X: Any) -> list[LayerSpec]:
    """LayerSpecs from LayerSpecs, profile rows ({"layer": ...}), layer dicts or a numeric array
    with :data:`SPEC_COLUMNS` (kind as its index in ``LAYER_KINDS``)."""
    if isinstance(X, np.ndarray):
        if X.ndim != 2 or X.shape[1] != len(SPEC_COLUMNS):
            raise ValueError(f"X: expected a 2-D array with columns {SPEC_COLUMNS}, got shape {X.shape}")
        out = []
        for row in X:
            values = [int(v) for v in row]
            if not 0 <= values[0] < len(LAYER_KINDS):
                raise ValueError(f"X: kind code {values[0]} not in 0..{len(LAYER_KINDS) - 1}")
            out.append(LayerSpec(LAYER_KINDS[values[0]], *values[1:]))
        return out
    if isinstance(X, (str, bytes, dict)) or not hasattr(X, "__iter__"):
        raise ValueError("X: expected a sequence of LayerSpecs, profile rows or layer dicts")
    out = []
    for i, item in enumerate(X):
        if isinstance(item, LayerSpec):
            out.append(item)
        elif isinstance(item, dict):
            layer = item.get("layer", item)
            try:
                out.append(LayerSpec.from_dict(layer))
            except (TypeError, ValueError) as err:
                raise ValueError(f"X[{i}]: {err}") from None
        else:
            raise ValueError(  # noqa: TRY004 - hwsplit reports bad input as ValueError (CLI exit 2)
                f"X[{i}]: expected a LayerSpec, a profile row or a layer dict, got {type(item).__name__}")
    return out


def _terms(spec: LayerSpec, block: int = 1, dw_multiple: int = 0) -> list[float]:
    out_pixels = spec.batch * spec.out_height * spec.out_width
    weights = (spec.in_channels // spec.groups) * spec.kernel * spec.kernel * spec.out_channels
    plain = [1.0, float(spec.macs), float(spec.batch * spec.in_channels * spec.height * spec.width),
             float(out_pixels * spec.out_channels), float(weights), float(out_pixels)]
    if block <= 1:
        return plain + [0.0] * 5
    d = dict(zip(DEVICE_TERMS, device_terms(spec, block, dw_multiple)))
    return plain + [d["blocked"], d["padded_macs"], d["unblocked_macs"], d["padded_out_elems"], d["reorder_elems"]]


def _fit_kind(T: np.ndarray, y: np.ndarray, alpha: float, relative: bool, mac_floor: float) -> np.ndarray:
    """Non-negative ridge least squares of ``T @ coef ≈ y`` (relative residuals if ``relative``)."""
    from scipy.optimize import lsq_linear

    y_scale = float(np.median(y)) if np.median(y) > 0 else 1.0
    col_scale = np.median(np.where(T > 0, T, np.nan), axis=0)
    col_scale = np.where(np.isfinite(col_scale) & (col_scale > 0), col_scale, 1.0)
    A = T / col_scale
    b = y / y_scale
    if relative:
        w = 1.0 / np.maximum(b, 1e-12)
        A, b = A * w[:, None], b * w
    if alpha > 0:
        A = np.vstack([A, math.sqrt(alpha) * np.eye(A.shape[1])])
        b = np.concatenate([b, np.zeros(A.shape[1])])
    lower = np.zeros(T.shape[1])
    lower[TERMS.index("macs")] = mac_floor * col_scale[TERMS.index("macs")] / y_scale
    res = lsq_linear(A, b, bounds=(lower, np.full(T.shape[1], np.inf)), method="bvls")
    return res.x * y_scale / col_scale


class LayerRegressor(RegressorMixin, BaseEstimator):
    """Per-kind non-negative linear regression of a layer's cost on :data:`TERMS`.

    alpha: ridge penalty on standardised coefficients. relative: weight rows by 1/y (fit relative
    error). min_mac_share: the MACs coefficient is at least this fraction of the median cost per
    MAC of the kind, so costs are strictly increasing in channels. Kinds seen fewer than
    ``min_rows_per_kind`` times (or not at all) use a model pooled over all kinds.

    Fitted attributes: ``coef_`` (kind → coefficients over ``TERMS``), ``pooled_coef_``,
    ``kinds_``, ``n_samples_``, ``slope_`` (kind → median cost per MAC).
    """

    def __init__(self, alpha: float = 1e-3, relative: bool = True, min_mac_share: float = 1e-3,
                 min_rows_per_kind: int = 3, channel_block: int = 1, depthwise_multiple: int = 0) -> None:
        self.alpha = alpha
        self.relative = relative
        self.min_mac_share = min_mac_share
        self.min_rows_per_kind = min_rows_per_kind
        self.channel_block = channel_block
        self.depthwise_multiple = depthwise_multiple

    def fit(self, X: Any, y: Any) -> LayerRegressor:
        specs = _as_specs(X)
        y = np.asarray(y, dtype=float).reshape(-1)
        if len(specs) != len(y):
            raise ValueError(f"y: {len(y)} targets for {len(specs)} layers")
        if len(specs) == 0:
            raise ValueError("X: no layers to fit")
        if not np.all(np.isfinite(y)) or np.any(y <= 0):
            raise ValueError("y: every target must be a finite positive number")
        if not self.alpha >= 0:
            raise ValueError(f"alpha: expected >= 0, got {self.alpha!r}")
        if not self.min_mac_share >= 0:
            raise ValueError(f"min_mac_share: expected >= 0, got {self.min_mac_share!r}")
        T = np.array([_terms(s, self.channel_block, self.depthwise_multiple) for s in specs])
        kinds = np.array([s.kind for s in specs])
        macs = T[:, TERMS.index("macs")]
        per_mac = y / np.maximum(macs, 1.0)
        pooled_slope = float(np.median(per_mac))
        self.pooled_coef_ = _fit_kind(T, y, self.alpha, self.relative, self.min_mac_share * pooled_slope)
        self.coef_: dict[str, np.ndarray] = {}
        self.slope_: dict[str, float] = {}
        for kind in LAYER_KINDS:
            mask = kinds == kind
            if mask.sum() == 0:
                continue
            slope = float(np.median(per_mac[mask]))
            self.slope_[kind] = slope
            if mask.sum() >= self.min_rows_per_kind:
                self.coef_[kind] = _fit_kind(T[mask], y[mask], self.alpha, self.relative,
                                             self.min_mac_share * slope)
        self.pooled_slope_ = pooled_slope
        self.kinds_ = sorted(self.coef_)
        self.n_samples_ = len(specs)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("LayerRegressor: not fitted yet; call fit first")

    def predict(self, X: Any) -> np.ndarray:
        self._check_fitted()
        specs = _as_specs(X)
        out = np.empty(len(specs))
        for i, s in enumerate(specs):
            coef = self.coef_.get(s.kind, self.pooled_coef_)
            out[i] = float(np.dot(coef, _terms(s, self.channel_block, self.depthwise_multiple)))
        return out

    def slope(self, spec: LayerSpec) -> float:
        """Median cost per MAC of ``spec``'s kind (a smooth positive prior)."""
        self._check_fitted()
        return self.slope_.get(spec.kind, self.pooled_slope_)

    def coefficients(self) -> dict[str, dict[str, float]]:
        """The fitted model as plain numbers: kind (and "pooled") → term → coefficient."""
        self._check_fitted()
        out = {k: dict(zip(TERMS, map(float, c))) for k, c in self.coef_.items()}
        out["pooled"] = dict(zip(TERMS, map(float, self.pooled_coef_)))
        return out


def profile_targets(profile: dict[str, Any], metric: str, source: str = "<profile>",
                    subtract_overhead: bool = True) -> tuple[list[LayerSpec], np.ndarray, float]:
    """LayerSpecs, per-layer targets (row medians minus the runtime overhead, floored at 1 %) and the
    overhead of ``metric`` in a validated profile."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    rows = [r for r in profile["rows"] if metric in r]
    if not rows:
        raise ValueError(missing_metric_message(source, metric))
    overhead_stats = (profile.get("overhead") or {}).get(metric)
    overhead = runtime_overhead(profile, metric) if overhead_stats and subtract_overhead else 0.0
    specs = [LayerSpec.from_dict(r["layer"]) for r in rows]
    raw = np.array([float(r[metric]["median"]) for r in rows])
    if np.any(raw <= 0):
        raise ValueError(f"profile {source}: {metric} medians must be positive to fit a predictor")
    y = np.maximum(raw - overhead, NET_FLOOR * raw)
    return specs, y, overhead


def context_targets(networks: Sequence[dict[str, Any]], overhead_node_ms: float) -> tuple[list[LayerSpec], np.ndarray]:
    """LayerSpecs and in-context targets (ms: a layer's node times + per-node overhead × its nodes,
    floored at 0.1 µs) of a profile's ``context["networks"]``."""
    specs, y = [], []
    for net in networks:
        for x in net.get("layers", []):
            specs.append(LayerSpec.from_dict(x["layer"]))
            y.append(max(float(x["latency_ms"]) + overhead_node_ms * int(x["nodes"]), 1e-4))
    return specs, np.asarray(y)


def fit_report(profile: str | os.PathLike[str] | dict[str, Any], metric: str = "latency_ms", *,
               test_size: float = 0.25, seed: int = 0, **regressor_options: Any) -> dict[str, Any]:
    """Held-out accuracy of :class:`LayerRegressor` on a profile's rows.

    Returns ``{"rmspe", "within_10pct", "r2", "n_train", "n_test", "metric", "unit"}``: root mean
    squared percentage error (a fraction), the share of held-out rows predicted within ±10 %, and
    R² — on the per-layer targets (medians minus the runtime overhead).
    """
    from sklearn.metrics import r2_score
    from sklearn.model_selection import train_test_split

    data, source = resolve_profile(profile)
    specs, y, _ = profile_targets(data, metric, source)
    if not 0 < test_size < 1:
        raise ValueError(f"test_size: expected a fraction between 0 and 1, got {test_size!r}")
    if len(specs) < 4:
        raise ValueError(f"profile {source}: {len(specs)} rows with {metric} are too few to hold some out")
    idx = np.arange(len(specs))
    train, test = train_test_split(idx, test_size=test_size, random_state=seed)
    with fitting(source, "the layer-cost regressor"):
        reg = LayerRegressor(**regressor_options).fit([specs[i] for i in train], y[train])
        pred = reg.predict([specs[i] for i in test])
    rel = (pred - y[test]) / y[test]
    return {"metric": metric, "unit": metric_unit(metric), "rmspe": float(np.sqrt(np.mean(rel ** 2))),
            "within_10pct": float(np.mean(np.abs(rel) <= 0.10)),
            "r2": float(r2_score(y[test], pred)) if len(test) > 1 else float("nan"),
            "n_train": len(train), "n_test": len(test)}


class EnergyPredictorCostModel(LayerCostModel):
    """Layer costs predicted by a :class:`LayerRegressor` fitted on a profile.

    ``metric=None`` means ``"energy_mj"`` (unit ``"mJ"``); a profile without energy is then a
    ``ValueError`` that says how to measure one. ``metric="latency_ms"`` (unit ``"ms"``) predicts
    latency instead. ``total`` adds the profile's measured runtime overhead once and, where the
    profile measured whole networks, is calibrated to them (:mod:`cost_models.calibration`). With a
    latency profile that timed layers in context (``context``) and ``in_context``, the regressor is
    fitted on those in-context layer times with the device's terms (padded channels, blocked or not,
    reorders; ``channel_block`` of the profile) and ``total`` adds the fitted per-network overhead.
    """

    name = "energy"

    def __init__(self, profile: str | os.PathLike[str] | dict[str, Any], metric: str | None = None,
                 subtract_overhead: bool = True, calibrate: bool = True, in_context: bool = True,
                 **regressor_options: Any) -> None:
        metric = "energy_mj" if metric is None else metric
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        self.profile, self.source = resolve_profile(profile)
        self.metric = metric
        self.unit = metric_unit(metric)
        context_nets = (self.profile.get("context") or {}).get("networks") or []
        self.context: ContextFit | None = None
        self._cache: dict[tuple, float] = {}
        self.network_fit: NetworkFit | None = None
        if metric == "latency_ms" and context_nets and in_context:
            # in-context per-layer targets (per-node overhead included), the device's block in the terms, and
            # the same end-to-end fit as the table's on the regressor's layer times (memoised: _in_context)
            self.context = ContextFit.of(context_nets, block=channel_block(self.profile),
                                         dw_multiple=depthwise_multiple(self.profile))
            self.regressor, self.network_fit = _in_context(self.context, context_nets, self.source,
                                                           regressor_options)
            self.overhead = self.network_fit.overhead_network_ms
        else:
            specs, y, self.overhead = profile_targets(self.profile, metric, self.source, subtract_overhead)
            with fitting(self.source, "the layer-cost regressor"):
                self.regressor = LayerRegressor(**regressor_options).fit(specs, y)
        if self.context is None and calibrate and self.profile.get("networks"):
            with fitting(self.source, "the whole-network calibration"):
                self.calibration = fit_calibration(self, self.profile["networks"], metric)

    def _price(self, spec: LayerSpec) -> float:
        raw = float(self.regressor.predict([spec])[0])
        if self.context is None or self.network_fit is None:
            return raw
        return self.network_fit.layer_ms(self.context.group(spec), raw, self.context.outputs(spec))

    def network_term(self, specs: Sequence[LayerSpec]) -> float:
        """The end-to-end fit's memory term (weights beyond the cache, ms); 0 without a context."""
        if self.context is None or self.network_fit is None:
            return 0.0
        return self.network_fit.memory_ms(sum(self.context.weights(s) for s in specs))

    def slope(self, spec: LayerSpec) -> float:
        return self.regressor.slope(spec)

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...], *,
                 groups: list | None = None) -> dict[str, float]:
        """Cost of one more channel per neuron group; > 0 by construction (floored as a safeguard)."""
        return positive_marginals(self, super().marginal(model, input_shape, groups=groups), model, input_shape,
                                  groups=groups)
