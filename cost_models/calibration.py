"""Calibrate a layer-sum cost model against whole networks measured end to end.

A network does not cost the sum of its layers measured one at a time: a layer measured alone
runs with its weights and input hot in cache and pays no hand-over between operators, a layer
inside a network does not. The profiler therefore also measures a few random networks of the
family end to end (``profile["networks"]``); this module fits

    measured ≈ scale · (overhead + Σ layer costs) + offset          (least squares, scale > 0)

and the cost model reports ``scale · (…) + offset`` as a network's total and ``scale · Δ`` as a
marginal cost. The scale does not change the knapsack's choice, only the unit is made true: a
budget of 4.5 ms means 4.5 ms measured end to end.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Fewer calibration networks than this: no offset is fitted, only a scale.
MIN_FOR_OFFSET = 6


@dataclass(frozen=True)
class Calibration:
    """``total = scale · layer_sum + offset`` (offset in the metric's unit)."""

    scale: float = 1.0
    offset: float = 0.0
    networks: int = 0
    rmspe_before: float | None = None
    rmspe_after: float | None = None
    #: range of the uncalibrated layer sums of the networks it was fitted on (where it was measured)
    raw_min: float | None = None
    raw_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fit_calibration(cost_model: Any, networks: list[dict[str, Any]], metric: str) -> Calibration:
    """Fit scale and offset of ``cost_model`` (uncalibrated) on the profile's measured networks."""
    from hwsplit.network.models import model_from_architecture

    raw, measured = [], []
    for net in networks:
        if metric not in net:
            continue
        model = model_from_architecture(net["architecture"]).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw.append(cost_model.layer_sum(model, tuple(net["input_shape"])))
        measured.append(float(net[metric]["median"]))
    if not raw:
        return Calibration()
    x, y = np.asarray(raw), np.asarray(measured)
    # Relative errors matter (a network of 0.2 ms and one of 5 ms count alike): weight by 1/y.
    if len(x) >= MIN_FOR_OFFSET:
        a = np.stack([x, np.ones_like(x)], axis=1) / y[:, None]
        scale, offset = np.linalg.lstsq(a, np.ones_like(y), rcond=None)[0]
    else:
        scale, offset = float(np.sum(x / y) / np.sum((x / y) ** 2)), 0.0
    if not scale > 0:
        log.warning("calibration on %d networks gave a non-positive scale; keeping the layer sum", len(x))
        return Calibration(networks=len(x))
    before = float(np.sqrt(np.mean(((x - y) / y) ** 2)))
    after = float(np.sqrt(np.mean(((scale * x + offset - y) / y) ** 2)))
    log.info("calibrated on %d networks measured end to end: total = %.3f · layer sum %+.4g (RMSPE %.1f%% → %.1f%%)",
             len(x), scale, offset, 100 * before, 100 * after)
    return Calibration(float(scale), float(offset), len(x), before, after, float(x.min()), float(x.max()))
