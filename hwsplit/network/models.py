"""Model families as data: per-layer widths and strides, keyword-only builders, a registry by name.

A family's architecture is a plain, JSON-serialisable dict (``architecture(model)``); the same dict
plus a state dict rebuilds the same model (``model_from_architecture``). Growth changes only widths.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

# MobileNetV1 body: (width, stride) of each depthwise-separable block after the stem.
MOBILENET_V1_STANDARD = {
    "stem": 32,
    "blocks": [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5
    + [(1024, 2), (1024, 1)],
}
# The paper's CIFAR-10 seed (arXiv:1910.03103, §5): 8, 8, 8/s2, 8, 16/s2, 16, 24/s2, 24 ×5, 32/s2, 32.
MOBILENET_V1_CIFAR_SEED = {
    "stem": 8,
    "blocks": [(8, 1), (8, 2), (8, 1), (16, 2), (16, 1), (24, 2)] + [(24, 1)] * 5 + [(32, 2), (32, 1)],
}
# A seed for 8×8 inputs (scikit-learn's digits): two resolution reductions instead of four.
MOBILENET_V1_TINY_SEED = {"stem": 4, "blocks": [(4, 1), (8, 2), (8, 1), (16, 2), (16, 1)]}
MOBILENET_V1_CONFIGS = {"standard": MOBILENET_V1_STANDARD, "cifar_seed": MOBILENET_V1_CIFAR_SEED,
                        "tiny_seed": MOBILENET_V1_TINY_SEED}


#: Widest layer (channels or features) and most classes a family (and a data set's labels, hwsplit.training.data)
#: accepts: beyond them an architecture is a corrupt or hostile file (a 10⁶-wide layer needs terabytes), not a
#: network, and a label a corrupt file, not a real class.
MAX_WIDTH = 1 << 16
MAX_CLASSES = 100_000


def _check_count(name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if value > limit:
        raise ValueError(f"{name}: {value:,} is more than hwsplit builds (at most {limit:,})")


def default_config(resolution: int) -> str:
    """The seed config that suits an input resolution: tiny_seed ≤ 16 px, cifar_seed < 64 px, else standard."""
    return "tiny_seed" if resolution <= 16 else "cifar_seed" if resolution < 64 else "standard"


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → activation, with children named conv, bn, act."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int, groups: int,
                 activation: str) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=_activation(activation),
        ))


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3×3 (stride s) → BN → act → pointwise 1×1 → BN → act."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, activation: str) -> None:
        super().__init__()
        self.dw = ConvBNAct(in_channels, in_channels, kernel=3, stride=stride, groups=in_channels,
                            activation=activation)
        self.pw = ConvBNAct(in_channels, out_channels, kernel=1, stride=1, groups=1, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


@dataclass(frozen=True)
class MobileNetV1Spec:
    """A MobileNetV1 as data. ``stem_stride`` is 1 for CIFAR-sized inputs, 2 for ImageNet."""

    stem_width: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    stem_stride: int = 1
    num_classes: int = 10
    in_channels: int = 3
    activation: str = "silu"
    dropout: float = 0.0
    family: str = field(default="mobilenet_v1", init=False)

    def __post_init__(self) -> None:
        _check_count("stem_width", self.stem_width, MAX_WIDTH)
        if len(self.widths) != len(self.strides):
            raise ValueError(f"widths: {len(self.widths)} widths for {len(self.strides)} strides")
        if not self.widths:
            raise ValueError("widths: at least one block is needed")
        for i, w in enumerate(self.widths):
            _check_count(f"widths[{i}]", w, MAX_WIDTH)
        for i, s in enumerate(self.strides):
            if s not in (1, 2):
                raise ValueError(f"strides[{i}]: expected 1 or 2, got {s!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 1 or 2, got {self.stem_stride!r}")
        _check_count("num_classes", self.num_classes, MAX_CLASSES)
        _check_count("in_channels", self.in_channels, MAX_WIDTH)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected 0 <= dropout < 1, got {self.dropout!r}")
        _activation(self.activation)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "stem_width": self.stem_width, "widths": list(self.widths),
                "strides": list(self.strides), "stem_stride": self.stem_stride,
                "num_classes": self.num_classes, "in_channels": self.in_channels,
                "activation": self.activation, "dropout": self.dropout}


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al., 2017) built from a :class:`MobileNetV1Spec`.

    Children: ``stem`` (ConvBNAct), ``blocks`` (Sequential of DepthwiseSeparable), ``pool``,
    ``flatten``, ``dropout``, ``classifier``. Widths are read back from the modules, so a model
    grown by :func:`hwsplit.apply_split` reports its new widths.
    """

    def __init__(self, spec: MobileNetV1Spec) -> None:
        super().__init__()
        self._spec = spec
        self.stem = ConvBNAct(spec.in_channels, spec.stem_width, kernel=3, stride=spec.stem_stride, groups=1,
                              activation=spec.activation)
        blocks = []
        prev = spec.stem_width
        for width, stride in zip(spec.widths, spec.strides):
            blocks.append(DepthwiseSeparable(prev, width, stride=stride, activation=spec.activation))
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(prev, spec.num_classes)
        _init_weights(self)

    @property
    def spec(self) -> MobileNetV1Spec:
        """The spec with the widths the modules have now."""
        return MobileNetV1Spec(
            stem_width=self.stem.conv.out_channels,
            widths=tuple(b.pw.conv.out_channels for b in self.blocks),
            strides=self._spec.strides, stem_stride=self._spec.stem_stride,
            num_classes=self._spec.num_classes, in_channels=self._spec.in_channels,
            activation=self._spec.activation, dropout=self._spec.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(self.dropout(self.flatten(self.pool(x))))


@dataclass(frozen=True)
class MLPSpec:
    """A multi-layer perceptron as data: hidden widths, activation, optional BatchNorm1d."""

    in_features: int
    widths: tuple[int, ...]
    num_classes: int = 10
    activation: str = "silu"
    batchnorm: bool = False
    family: str = field(default="mlp", init=False)

    def __post_init__(self) -> None:
        _check_count("in_features", self.in_features, MAX_WIDTH * 64)
        if not self.widths:
            raise ValueError("widths: at least one hidden layer is needed")
        for i, w in enumerate(self.widths):
            _check_count(f"widths[{i}]", w, MAX_WIDTH)
        _check_count("num_classes", self.num_classes, MAX_CLASSES)
        _activation(self.activation)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "in_features": self.in_features, "widths": list(self.widths),
                "num_classes": self.num_classes, "activation": self.activation, "batchnorm": self.batchnorm}


class MLP(nn.Module):
    """Flatten → [Linear → (BatchNorm1d) → act] × len(widths) → Linear. Hidden layers in ``hidden``."""

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self._spec = spec
        self.flatten = nn.Flatten(1)
        layers = []
        prev = spec.in_features
        for w in spec.widths:
            parts = OrderedDict(fc=nn.Linear(prev, w))
            if spec.batchnorm:
                parts["bn"] = nn.BatchNorm1d(w)
            parts["act"] = _activation(spec.activation)
            layers.append(nn.Sequential(parts))
            prev = w
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, spec.num_classes)

    @property
    def spec(self) -> MLPSpec:
        return MLPSpec(in_features=self._spec.in_features, widths=tuple(h.fc.out_features for h in self.hidden),
                       num_classes=self._spec.num_classes, activation=self._spec.activation,
                       batchnorm=self._spec.batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.flatten(x)))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Builders and registry
# --------------------------------------------------------------------------------------------

def mobilenet_v1(*, config: str = "standard", width_mult: float = 1.0, num_classes: int = 1000,
                 resolution: int = 224, in_channels: int = 3, activation: str | None = None,
                 widths: list[int] | None = None, stem_width: int | None = None,
                 strides: list[int] | None = None, stem_stride: int | None = None,
                 dropout: float = 0.0) -> MobileNetV1:
    """MobileNetV1 from a named config ("standard" or "cifar_seed") scaled by ``width_mult``.

    ``stem_stride`` defaults to 2 for ``resolution`` ≥ 64 (ImageNet stem) and 1 below (CIFAR stem).
    ``activation`` defaults to ReLU for "standard" and SiLU (the paper's growth models) for the
    seeds ("cifar_seed", "tiny_seed"). Explicit ``widths``/``stem_width``/``strides`` override the config.
    """
    if config not in MOBILENET_V1_CONFIGS:
        raise ValueError(f"config: expected one of {sorted(MOBILENET_V1_CONFIGS)}, got {config!r}")
    if not width_mult > 0:
        raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
    base = MOBILENET_V1_CONFIGS[config]
    scale = (lambda c: max(1, int(round(c * width_mult))))
    spec = MobileNetV1Spec(
        stem_width=stem_width if stem_width is not None else scale(base["stem"]),
        widths=tuple(widths) if widths is not None else tuple(scale(w) for w, _ in base["blocks"]),
        strides=tuple(strides) if strides is not None else tuple(s for _, s in base["blocks"]),
        stem_stride=stem_stride if stem_stride is not None else (2 if resolution >= 64 else 1),
        num_classes=num_classes, in_channels=in_channels,
        activation=activation or ("relu" if config == "standard" else "silu"), dropout=dropout,
    )
    return MobileNetV1(spec)


def mlp(*, in_features: int | None = None, widths: list[int] | tuple[int, ...] = (32, 32), num_classes: int = 10,
        activation: str = "silu", batchnorm: bool = False, width_mult: float = 1.0, in_channels: int | None = None,
        resolution: int | None = None) -> MLP:
    """A multi-layer perceptron (``in_features`` inputs, flattened).

    ``in_features`` defaults to ``in_channels × resolution²`` when those are given, else 64 (8×8
    digits). ``width_mult`` scales the hidden ``widths`` (rounded, at least 1).
    """
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
    if in_features is None:
        in_features = (in_channels or 1) * (resolution or 8) ** 2 if (in_channels or resolution) else 64
    if width_mult != 1.0:
        widths = [max(1, int(round(w * width_mult))) if isinstance(w, int) else w for w in widths]
    return MLP(MLPSpec(in_features=in_features, widths=tuple(widths), num_classes=num_classes,
                       activation=activation, batchnorm=batchnorm))


# --------------------------------------------------------------------------------------------
# torchvision's MobileNetV2 as a family: base build + per-layer widths
# --------------------------------------------------------------------------------------------

TORCHVISION_MOBILENET_V2 = "torchvision:mobilenet_v2"
# Resolution of the zero input used to trace a torchvision MobileNetV2 (any size ≥ 1 works).
_TRACE_RESOLUTION = 32


def _producer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every dense Conv2d (groups=1), by module path, in module order."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}


def torchvision_mobilenet_v2(*, width_mult: float = 1.0, num_classes: int = 1000, in_channels: int = 3,
                             dropout: float = 0.2, widths: dict[str, int] | None = None,
                             resolution: int | None = None) -> nn.Module:
    """torchvision's own ``MobileNetV2`` (``torchvision.models.mobilenet_v2``, no pretrained weights).

    ``in_channels`` other than 3 replaces the stem convolution ``features.0.0`` by one with that
    many input channels (same kernel, stride and padding), so 1-channel images work; the model is
    still a ``torchvision.models.MobileNetV2``. ``widths`` maps dense convolutions (module paths,
    e.g. ``"features.2.conv.0.0"``) to their number of output channels; layers may only be wider
    than the base build, and only splittable ones (the expansion layers, the stem, the last
    projection and the head: channels tied by a residual add cannot change). ``resolution`` is
    accepted for symmetry with the other families and ignored (the network is fully convolutional).
    """
    import torchvision

    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ValueError(f"width_mult: expected a positive number, got {width_mult!r}")
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout: expected 0 <= dropout < 1, got {dropout!r}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=float(width_mult), num_classes=num_classes,
                                            dropout=float(dropout))
    if in_channels != 3:
        old = model.features[0][0]
        stem = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out")
        model.features[0][0] = stem
    model.hwsplit_arch = {"family": TORCHVISION_MOBILENET_V2, "width_mult": float(width_mult),
                          "num_classes": num_classes, "in_channels": in_channels, "dropout": float(dropout)}
    if widths:
        _resize_torchvision(model, widths)
    return model


def _resize_torchvision(model: nn.Module, widths: dict[str, int]) -> None:
    from hwsplit.network.graph import find_neuron_groups
    from hwsplit.network.resize import resize_groups

    if not isinstance(widths, dict):
        raise ValueError(f"widths: expected {{layer path: width}} for {TORCHVISION_MOBILENET_V2}, "
                         f"got {type(widths).__name__}")
    base = _producer_widths(model)
    for name, width in widths.items():
        if name not in base:
            raise ValueError(f"widths[{name!r}]: no dense convolution of that name in {TORCHVISION_MOBILENET_V2} "
                             f"(width_mult={model.hwsplit_arch['width_mult']})")
        _check_count(f"widths[{name!r}]", width, MAX_WIDTH)
    changed = {name: w for name, w in widths.items() if w != base[name]}
    if not changed:
        return
    example = torch.zeros(1, model.hwsplit_arch["in_channels"], _TRACE_RESOLUTION, _TRACE_RESOLUTION)
    resize_groups(model, changed, find_neuron_groups(model, example))


def _torchvision_architecture(model: nn.Module) -> dict[str, Any]:
    arch = dict(model.hwsplit_arch)
    arch["in_channels"] = model.features[0][0].in_channels
    arch["num_classes"] = model.classifier[-1].out_features
    arch["widths"] = _producer_widths(model)
    return arch


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v1_cifar": lambda **kw: mobilenet_v1(**{"config": "cifar_seed", "resolution": 32,
                                                        "num_classes": 10, **kw}),
    "mlp": mlp,
    TORCHVISION_MOBILENET_V2: torchvision_mobilenet_v2,
}


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, **options: Any) -> nn.Module:
    """Build a registered model family by name, e.g. ``build_model("mobilenet_v1", width_mult=0.5)``."""
    if name not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; available: {', '.join(available_models())}")
    try:
        return MODELS[name](**options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        unknown = str(err).rsplit("argument", 1)[-1].strip()
        raise ValueError(f"model: {name} does not take the option {unknown}") from None


_SPEC_TYPES = {"mobilenet_v1": (MobileNetV1Spec, MobileNetV1), "mlp": (MLPSpec, MLP)}


def architecture(model: nn.Module) -> dict[str, Any]:
    """The model's current architecture as a JSON-serialisable dict (its family and widths)."""
    if getattr(model, "hwsplit_arch", {}).get("family") == TORCHVISION_MOBILENET_V2:
        return _torchvision_architecture(model)
    if type(model).__name__ == "MobileNetV2" and type(model).__module__.startswith("torchvision"):
        raise ValueError(f"model: a torchvision MobileNetV2 must be built with build_model("
                         f"{TORCHVISION_MOBILENET_V2!r}, width_mult=...) so that its architecture is known")
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "to_dict"):
        raise ValueError(f"model: {type(model).__name__} is not an hwsplit model family")
    return spec.to_dict()


def model_from_architecture(arch: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model from :func:`architecture`'s dict (and load ``state_dict`` if given)."""
    if not isinstance(arch, dict):
        raise ValueError(f"architecture: expected a dict, got {type(arch).__name__}")
    arch = copy.deepcopy(dict(arch))
    family = arch.pop("family", None)
    known = sorted([*_SPEC_TYPES, TORCHVISION_MOBILENET_V2])
    if family not in known:
        raise ValueError(f"family: unknown model family {family!r}; known: {known}")
    if family == TORCHVISION_MOBILENET_V2:
        try:
            model = torchvision_mobilenet_v2(**arch)
        except TypeError as err:
            raise ValueError(f"architecture: {err}") from None
    else:
        spec_type, model_type = _SPEC_TYPES[family]
        for key in ("widths", "strides"):
            if key in arch:
                if not isinstance(arch[key], (list, tuple)):
                    raise ValueError(f"{key}: expected a list, got {type(arch[key]).__name__}")
                arch[key] = tuple(arch[key])
        try:
            spec = spec_type(**arch)
        except TypeError as err:
            raise ValueError(f"architecture: {err}") from None
        model = model_type(spec)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            detail = lines[0] if lines else str(err).splitlines()[0]
            raise ValueError(f"state_dict: does not fit the {family} architecture ({detail})") from None
    return model
