"""LayerSpec, the CostModel protocol, the generic total/marginal arithmetic and the registry.

A :class:`LayerSpec` describes one layer as the hardware sees it (DESIGN.md §4). A cost model
only has to price a single LayerSpec (``layer_cost``); :class:`LayerCostModel` turns that into the
cost of a whole model (``total``) and the cost of one more channel in each neuron group
(``marginal``), re-evaluated on the model's current architecture at every call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

from cost_models.calibration import Calibration

log = logging.getLogger(__name__)

LAYER_KINDS = ("conv", "dwconv", "pwconv", "linear")


@dataclass(frozen=True)
class LayerSpec:
    """One Conv2d or Linear layer as a device executes it.

    kind: ``"conv"`` (dense k×k, k > 1, or grouped), ``"dwconv"`` (groups == in == out),
    ``"pwconv"`` (dense 1×1) or ``"linear"``. ``height``/``width`` are the *input* feature-map
    size in pixels (1 for linear layers); ``batch`` the number of samples per inference.
    ``padding`` defaults to ``kernel // 2`` ("same" for odd kernels). ``name`` is the module path
    in the model it came from and is not part of what a device measures.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    height: int = 1
    width: int = 1
    batch: int = 1
    padding: int | None = None
    bias: bool = False
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind: expected one of {LAYER_KINDS}, got {self.kind!r}")
        for field in ("in_channels", "out_channels", "kernel", "stride", "groups", "height", "width", "batch"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: expected a positive integer, got {value!r}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups: {self.groups} does not divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        if self.padding is None:
            object.__setattr__(self, "padding", self.kernel // 2)

    # -- derived geometry -------------------------------------------------------------------
    @property
    def out_height(self) -> int:
        return (self.height + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one inference of ``batch`` samples (bias adds not counted)."""
        per_pixel = (self.in_channels // self.groups) * self.kernel * self.kernel * self.out_channels
        return self.batch * per_pixel * self.out_height * self.out_width

    @property
    def params(self) -> int:
        weights = (self.in_channels // self.groups) * self.kernel * self.kernel * self.out_channels
        return weights + (self.out_channels if self.bias else 0)

    @property
    def bytes_moved(self) -> int:
        """float32 bytes read and written: input + weights + output feature maps."""
        inputs = self.batch * self.in_channels * self.height * self.width
        outputs = self.batch * self.out_channels * self.out_height * self.out_width
        return 4 * (inputs + self.params + outputs)

    def key(self) -> tuple:
        """What identifies the layer on a device, ``name`` excluded."""
        return (self.kind, self.in_channels, self.out_channels, self.kernel, self.stride, self.groups,
                self.height, self.width, self.batch)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"layer: unknown fields {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> LayerSpec:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class CostModel(Protocol):
    """What the knapsack needs from a cost model (DESIGN.md §4)."""

    name: str
    unit: str

    def layer_cost(self, spec: LayerSpec) -> float: ...

    def total(self, model: nn.Module, input_shape: tuple[int, ...]) -> float: ...

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]: ...


def widened_specs(spec: LayerSpec, role: str, columns: int = 1) -> LayerSpec:
    """``spec`` after one more channel flows through it in ``role``.

    role: ``"producer"`` (one more output channel), ``"depthwise"`` (one more channel in, out and
    group), ``"consumer"`` (``columns`` more input features: 1 for a conv, H·W for a linear layer
    behind a flatten).
    """
    if role == "producer":
        return spec.replace(out_channels=spec.out_channels + 1)
    if role == "depthwise":
        return spec.replace(in_channels=spec.in_channels + 1, out_channels=spec.out_channels + 1,
                            groups=spec.groups + 1)
    if role == "consumer":
        return spec.replace(in_channels=spec.in_channels + columns)
    raise ValueError(f"role: expected producer, depthwise or consumer, got {role!r}")


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

    def layer_sum(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """``overhead`` + Σ ``layer_cost`` over the model's LayerSpecs, before any calibration."""
        from hwsplit.graph import layer_specs

        return self.overhead + sum(self.layer_cost(s) for s in layer_specs(model, input_shape))

    def total(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        cal = self.calibration
        return cal.scale * self.layer_sum(model, input_shape) + cal.offset

    def marginal(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        import torch

        from hwsplit.graph import find_neuron_groups, layer_specs

        specs = layer_specs(model, input_shape)
        by_name: dict[str, list[LayerSpec]] = {}
        for s in specs:
            by_name.setdefault(s.name, []).append(s)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        groups = find_neuron_groups(model, torch.zeros(input_shape, device=device, dtype=dtype))
        out: dict[str, float] = {}
        for g in groups:
            if not g.splittable:
                continue
            touched = [(g.producer, "producer", 1)]
            touched += [(name, "depthwise", 1) for name in g.depthwise]
            touched += [(c.name, "consumer", c.columns) for c in g.consumers]
            delta = 0.0
            for name, role, columns in touched:
                for spec in by_name.get(name, []):
                    delta += self.layer_cost(widened_specs(spec, role, columns)) - self.layer_cost(spec)
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
