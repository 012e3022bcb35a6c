"""One registry record per model family: its builder, default input, seed sizing and width range.

Everything the run layer, the CLI and the profiler need to know about a family lives here (and
nowhere else): how to size its seed for a data set (input channels, resolution, classes), what
input a summary traces it with, and the range of widths its layers take while it grows (from the
seed to the standard widths), which the profiler's grid covers. Builders are in
:mod:`hwsplit.models`. See docs/design.md §5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hwsplit.blocks import make_divisible
from hwsplit.models import (
    MOBILENET_V1_CIFAR_SEED,
    MOBILENET_V1_CONFIGS,
    MOBILENET_V1_STANDARD,
    TORCHVISION_MOBILENET_V2,
    build_model,
    default_config,
    mlp,
)


def _mobilenet_v1_cifar_seed(options: dict[str, Any], shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    c, h, _ = shape
    options.setdefault("in_channels", c)
    options.setdefault("resolution", h)
    options.setdefault("num_classes", classes)
    return options


def _mobilenet_v1_seed(options: dict[str, Any], shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    """The cifar seed's sizing, plus the seed config that suits the input resolution."""
    options.setdefault("config", default_config(shape[1]))
    return _mobilenet_v1_cifar_seed(options, shape, classes)


def _mlp_seed(options: dict[str, Any], shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    c, h, w = shape
    options.setdefault("in_features", c * h * w)
    options.setdefault("num_classes", classes)
    return options


def _tv_mobilenet_v2_seed(options: dict[str, Any], shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    # in_channels other than 3 (e.g. 1-channel digits) replaces torchvision's stem convolution
    options.setdefault("in_channels", shape[0])
    options.setdefault("num_classes", classes)
    return options


def _mobilenet_v1_widths() -> tuple[list[int], list[int]]:
    lo = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    hi = [MOBILENET_V1_STANDARD["stem"]] + [w for w, _ in MOBILENET_V1_STANDARD["blocks"]]
    return lo, hi


def _align_mobilenet_v1(options: dict[str, Any], multiple: int, default: str = "standard") -> dict[str, Any]:
    """Explicit widths and stem width, each the configured one (× width_mult) rounded by make_divisible."""
    base = MOBILENET_V1_CONFIGS[options.get("config", default)]
    mult = options.get("width_mult", 1.0)
    widths = options.get("widths") or [w * mult for w, _ in base["blocks"]]
    stem = options.get("stem_width") or base["stem"] * mult
    options["widths"] = [make_divisible(w, multiple) for w in widths]
    options["stem_width"] = make_divisible(stem, multiple)
    return options


def _align_mlp(options: dict[str, Any], multiple: int) -> dict[str, Any]:
    """Explicit hidden widths (× width_mult) rounded by make_divisible; width_mult then 1."""
    import inspect

    widths = options.get("widths", inspect.signature(mlp).parameters["widths"].default)
    mult = options.pop("width_mult", 1.0)
    options["widths"] = [make_divisible(w * mult, multiple) for w in widths]
    return options


@dataclass(frozen=True)
class Family:
    """A model family as the run layer sees it.

    ``seed_options(options, (C, H, W), classes)`` completes builder options from a data set;
    ``default_resolution`` is the input side a summary traces the family with when none is given
    (``None``: a flat input of ``in_features``); ``width_range()`` gives the per-layer widths of the
    seed and of the largest network the family grows towards (stem first, then the blocks), or
    ``None`` when the family has no fixed layer list. ``align(options, N)`` rounds the seed's
    widths to multiples of N (``grow --channel-multiple``; ``None``: not supported).
    """

    name: str
    seed_options: Callable[[dict[str, Any], tuple[int, int, int], int], dict[str, Any]]
    default_resolution: int | None = 32
    width_range: Callable[[], tuple[list[int], list[int]]] | None = None
    align: Callable[[dict[str, Any], int], dict[str, Any]] | None = None

    def build(self, **options: Any) -> nn.Module:
        return build_model(self.name, **options)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mobilenet_v1", _mobilenet_v1_seed, 224, _mobilenet_v1_widths, _align_mobilenet_v1),
    Family("mobilenet_v1_cifar", _mobilenet_v1_cifar_seed, 32, _mobilenet_v1_widths,
           lambda options, n: _align_mobilenet_v1(options, n, "cifar_seed")),
    Family("mlp", _mlp_seed, None, align=_align_mlp),
    Family(TORCHVISION_MOBILENET_V2, _tv_mobilenet_v2_seed, 224),
)}


def get_family(name: str) -> Family:
    """The registry record of ``name``; ``ValueError`` naming the field ``model`` if unknown."""
    if name not in FAMILIES:
        raise ValueError(f"model: unknown name {name!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def seed_options(name: str, options: dict[str, Any], input_shape: tuple[int, int, int],
                 num_classes: int) -> dict[str, Any]:
    """Builder options of a family's seed: ``options`` completed for ``input_shape`` (C, H, W) and classes."""
    return get_family(name).seed_options(dict(options), tuple(input_shape), int(num_classes))


def build_seed(name: str, options: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int, *,
               width_mult: float = 1.0, channel_multiple: int | None = None) -> nn.Module:
    """The seed of family ``name`` sized for the data; ``width_mult`` multiplies the configured width multiplier.

    ``channel_multiple`` N rounds every growing width to a multiple of N with torchvision's
    make-divisible rule (:func:`hwsplit.blocks.make_divisible`); ``ValueError`` naming
    ``channel_multiple`` for a family that cannot (see :func:`supports_channel_multiple`).
    """
    opts = seed_options(name, options, input_shape, num_classes)
    if width_mult != 1.0:
        opts["width_mult"] = opts.get("width_mult", 1.0) * width_mult
    if channel_multiple is not None:
        family = get_family(name)
        if family.align is None:
            raise ValueError(f"channel_multiple: the {name} family cannot round its seed's widths (supported: "
                             f"{', '.join(n for n, f in FAMILIES.items() if f.align)})")
        opts = family.align(opts, int(channel_multiple))
    return build_model(name, **opts)


def supports_channel_multiple(name: str) -> bool:
    """Whether family ``name`` can round its seed's widths to a channel multiple."""
    return name in FAMILIES and FAMILIES[name].align is not None


__all__ = ["FAMILIES", "Family", "build_seed", "get_family", "seed_options", "supports_channel_multiple"]
