"""The CostModel protocol, the generic total/marginal arithmetic and the registry.

A :class:`~hwsplit.network.specs.LayerSpec` describes one layer as the hardware sees it (docs/design.md §4). A cost
model only has to price a single LayerSpec (``layer_cost``); :class:`LayerCostModel` turns that into the
cost of a whole model (``total``) and the cost of one more channel in each neuron group
(``marginal``), re-evaluated on the model's current architecture at every call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

from cost_models.calibration import Calibration
from hwsplit.infra.errors import CostOutOfRange
from hwsplit.network.graph import find_neuron_groups, layer_specs
from hwsplit.network.specs import LAYER_KINDS, LayerSpec, widened_specs

log = logging.getLogger(__name__)

# LayerSpec, LAYER_KINDS and widened_specs live with the graph (hwsplit.network.specs); re-exported here
__all__ = ["LAYER_KINDS", "CostModel", "LayerCostModel", "LayerSpec", "available_cost_models", "get_cost_model",
           "register_cost_model", "widened_specs"]


@runtime_checkable
class CostModel(Protocol):
    """What the knapsack needs from a cost model (docs/design.md §4)."""

    name: str
    unit: str

    def layer_cost(self, spec: LayerSpec) -> float: ...

    def total(self, model: nn.Module, input_shape: tuple[int, ...]) -> float: ...

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...], *,
                 groups: list | None = None) -> dict[str, float]: ...


class LayerCostModel:
    """Base class: a cost model defined by the cost of one layer.

    ``total`` sums ``layer_cost`` over the model's LayerSpecs (plus ``overhead``);
    ``marginal`` prices, for every splittable neuron group, the layers one more channel touches
    (producer row, depthwise chain, consumer columns) and returns new-minus-old.
    """

    name = "base"
    unit = ""
    overhead: float = 0.0
    #: scale and offset fitted on whole networks (cost_models.calibration); identity by default
    calibration: Calibration = Calibration()

    def layer_cost(self, spec: LayerSpec) -> float:
        """The cost of one layer, memoised per LayerSpec key (``_price`` does the work)."""
        cache = self.__dict__.setdefault("_cache", {})
        key = spec.key()
        if key not in cache:
            cache[key] = self._price(spec)
        return cache[key]

    def _price(self, spec: LayerSpec) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def network_term(self, specs: Sequence[LayerSpec]) -> float:
        """What the network costs beyond its layers one by one, given all its LayerSpecs (in ``unit``;
        e.g. weights that spill out of the cache, :mod:`cost_models.context`). 0 here."""
        return 0.0

    def layer_sum(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """``overhead`` + Σ ``layer_cost`` + ``network_term`` over the model's LayerSpecs, before any
        calibration."""
        specs = layer_specs(model, input_shape)
        return self.overhead + sum(self.layer_cost(s) for s in specs) + self.network_term(specs)

    def total(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """``scale · layer_sum + offset`` in ``unit``. A network priced <= 0 (or not finite) is a
        :class:`~hwsplit.infra.errors.CostOutOfRange` naming the profile; one whose layer sum lies outside
        the whole networks the calibration was fitted on is logged once per direction."""
        cal = self.calibration
        raw = self.layer_sum(model, input_shape)
        value = cal.scale * raw + cal.offset
        source = getattr(self, "source", None)
        where = f" from the profile {source}" if source else ""
        if not (math.isfinite(value) and value > 0):
            fitted = (f" = {cal.scale:.3g} × layer sum {raw:.4g} {cal.offset:+.4g}, calibrated on {cal.networks} "
                      f"whole networks of layer sum {cal.raw_min:.4g}-{cal.raw_max:.4g} {self.unit}"
                      if cal.raw_min is not None else "")
            raise CostOutOfRange(f"cost: the {self.name} cost model{where} prices a network at {value:.4g} "
                                 f"{self.unit}{fitted}; a network cannot cost <= 0 (the profile does not fit "
                                 "networks this small: profile the device again, or use --cost flops)")
        if cal.raw_min is not None and not cal.raw_min <= raw <= cal.raw_max:
            side = "below" if raw < cal.raw_min else "above"
            warned = self.__dict__.setdefault("_range_warned", set())
            if side not in warned:
                warned.add(side)
                log.warning("%s%s: a network whose layers sum to %.4g %s is %s the %d whole networks the profile "
                            "measured (%.4g-%.4g %s): its total %.4g %s extrapolates the calibration", self.name,
                            where, raw, self.unit, side, cal.networks, cal.raw_min, cal.raw_max, self.unit, value,
                            self.unit)
        return value

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...], *,
                 groups: list | None = None) -> dict[str, float]:
        """Cost of one more channel in each splittable group of ``model`` (new minus old).

        ``groups`` are the model's neuron groups when the caller has traced it already (the stage
        loop traces once per stage); otherwise they are found here.
        """
        import torch

        specs = layer_specs(model, input_shape)
        by_name: dict[str, list[LayerSpec]] = {}
        for s in specs:
            by_name.setdefault(s.name, []).append(s)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        if groups is None:
            groups = find_neuron_groups(model, torch.zeros(input_shape, device=device, dtype=dtype))
        whole = type(self).network_term is not LayerCostModel.network_term
        term = self.network_term(specs) if whole else 0.0
        out: dict[str, float] = {}
        for g in groups:
            if not g.splittable:
                continue
            touched = [(g.producer, "producer", 1)]
            touched += [(name, "depthwise", 1) for name in g.depthwise]
            touched += [(c.name, "consumer", c.columns) for c in g.consumers]
            delta = 0.0
            wider: dict[int, LayerSpec] = {}
            for name, role, columns in touched:
                for spec in by_name.get(name, []):
                    wider[id(spec)] = widened_specs(spec, role, columns)
                    delta += self.layer_cost(wider[id(spec)]) - self.layer_cost(spec)
            if whole:
                delta += self.network_term([wider.get(id(s), s) for s in specs]) - term
            out[g.name] = self.calibration.scale * delta
        return out


_REGISTRY: dict[str, Callable[..., CostModel]] = {}


def register_cost_model(name: str) -> Callable[[Callable[..., CostModel]], Callable[..., CostModel]]:
    """Class decorator: make a cost model available to :func:`get_cost_model` under ``name``."""

    def wrap(factory: Callable[..., CostModel]) -> Callable[..., CostModel]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_cost_models() -> list[str]:
    return sorted(_REGISTRY)


def get_cost_model(name: str, **options: Any) -> CostModel:
    """Return the cost model registered as ``name`` ("flops", "lut", "energy", ...)."""
    if name not in _REGISTRY:
        raise ValueError(f"cost model: unknown name {name!r}; available: {', '.join(available_cost_models())}")
    return _REGISTRY[name](**options)
