"""LayerSpec: one Conv2d or Linear layer as a device executes it (docs/design.md §4).

The bottom of the stack with :mod:`hwsplit.network.graph`, which builds LayerSpecs from a model: cost
models (``cost_models``) price them, nothing here knows about costs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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
