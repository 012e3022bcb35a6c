"""One registry record per model family: its builder, default input, seed sizing and width range.

Everything the run layer, the CLI and the profiler need to know about a family lives here (and
nowhere else): how to size its seed for a data set (input channels, resolution, classes), what
input a summary traces it with, and the range of widths its layers take while it grows (from the
seed to the standard widths), which the profiler's grid covers. Builders are in
:mod:`hwsplit.network.models`; :func:`make_divisible` is the one rounding of a width to a channel multiple
(seeds, the width baseline, the profiler's grid). See docs/design.md §5.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hwsplit.network.models import (
    MOBILENET_V1_CIFAR_SEED,
    MOBILENET_V1_CONFIGS,
    MOBILENET_V1_STANDARD,
    TORCHVISION_MOBILENET_V2,
    build_model,
    default_config,
    mlp,
)


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """``v`` rounded to the nearest multiple of ``divisor``, at least ``min_value`` (default ``divisor``)
    and never below 90 % of ``v`` — torchvision's ``_make_divisible`` (MobileNetV2/V3), in channels."""
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"divisor: expected a positive integer, got {divisor!r}")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"v: expected a finite positive width, got {v!r}")
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # rounding down must not remove more than 10 %
        new_v += divisor
    return int(new_v)

#: The authors' width ceiling for MobileNetV1 (``max_splitcfg`` in dilinwang820/fast-energy-aware-splitting,
#: mbv1_cifar100/config.py and mbv1_imagenet/config.py): stem first, then the 13 blocks — the standard
#: widths up to 128, 1.25× them from the 256-wide blocks on.
MOBILENET_V1_AUTHORS_MAX_WIDTHS = [32, 64, 128, 128, 320, 320] + [640] * 6 + [1280, 1280]
#: Width ceilings a family may resolve (``grow --max-widths``).
CEILINGS = ("standard", "authors")


def _mobilenet_v1_ceilings(kind: str, names: Sequence[str]) -> dict[str, int]:
    """Per group, the width at the same position (stem, block i) of the standard MobileNetV1 1.0×
    (``MOBILENET_V1_STANDARD``: stem 32, blocks 64, 128, 128, 256, 256, 512 ×6, 1024, 1024) or of the
    authors' ``max_splitcfg``. Every seed config (tiny, cifar, standard) has the standard network's first
    blocks at the same positions; blocks past the 13th have no ceiling."""
    table = ([MOBILENET_V1_STANDARD["stem"]] + [w for w, _ in MOBILENET_V1_STANDARD["blocks"]]
             if kind == "standard" else MOBILENET_V1_AUTHORS_MAX_WIDTHS)
    out = {}
    for name in names:
        m = re.fullmatch(r"blocks\.(\d+)\.pw\.conv", name)
        i = 0 if name == "stem.conv" else int(m.group(1)) + 1 if m else None
        if i is not None and i < len(table):
            out[name] = table[i]
    return out


@functools.lru_cache(maxsize=1)
def _tv_mobilenet_v2_standard() -> dict[str, int]:
    model = build_model(TORCHVISION_MOBILENET_V2, width_mult=1.0)
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}


def _tv_mobilenet_v2_ceilings(kind: str, names: Sequence[str]) -> dict[str, int]:
    """Per group, its width in torchvision's MobileNetV2 at ``width_mult=1.0`` (for ``standard`` and
    ``authors`` alike: no other ceiling of the authors' is used here)."""
    widths = _tv_mobilenet_v2_standard()
    return {n: widths[n] for n in names if n in widths}


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
    ``ceilings(kind, group_names)`` gives the width ceiling of each named neuron group for ``kind`` in
    :data:`CEILINGS` (``grow --max-widths``; groups it leaves out, and every group of a family without
    it (``None``, e.g. the MLP, which has no standard widths), have no ceiling).
    """

    name: str
    seed_options: Callable[[dict[str, Any], tuple[int, int, int], int], dict[str, Any]]
    default_resolution: int | None = 32
    width_range: Callable[[], tuple[list[int], list[int]]] | None = None
    align: Callable[[dict[str, Any], int], dict[str, Any]] | None = None
    ceilings: Callable[[str, Sequence[str]], dict[str, int]] | None = None

    def build(self, **options: Any) -> nn.Module:
        return build_model(self.name, **options)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mobilenet_v1", _mobilenet_v1_seed, 224, _mobilenet_v1_widths, _align_mobilenet_v1,
           _mobilenet_v1_ceilings),
    Family("mobilenet_v1_cifar", _mobilenet_v1_cifar_seed, 32, _mobilenet_v1_widths,
           lambda options, n: _align_mobilenet_v1(options, n, "cifar_seed"), _mobilenet_v1_ceilings),
    Family("mlp", _mlp_seed, None, align=_align_mlp),
    Family(TORCHVISION_MOBILENET_V2, _tv_mobilenet_v2_seed, 224, ceilings=_tv_mobilenet_v2_ceilings),
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
    make-divisible rule (:func:`hwsplit.network.families.make_divisible`); ``ValueError`` naming
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


def width_ceilings(name: str, max_widths: str | Sequence[int] | None, group_names: Sequence[str]) -> dict[str, int]:
    """The width ceiling of each neuron group of family ``name`` (``grow --max-widths``): ``None`` → none;
    ``"standard"``/``"authors"`` → the family's (:attr:`Family.ceilings`; none for a family without);
    a sequence of whole numbers → one per group, in ``group_names``' order (the splittable layers in
    graph order, a record's ``layers``). ``ValueError`` naming ``max_widths`` otherwise."""
    if max_widths is None:
        return {}
    if isinstance(max_widths, str):
        if max_widths not in CEILINGS:
            raise ValueError(f"max_widths: expected {', '.join(CEILINGS)}, none or whole numbers, got {max_widths!r}")
        family = get_family(name)
        return family.ceilings(max_widths, list(group_names)) if family.ceilings else {}
    widths = list(max_widths)
    if len(widths) != len(group_names):
        raise ValueError(f"max_widths: {len(widths)} numbers for the {len(group_names)} growing layers of this "
                         f"{name} network ({', '.join(group_names)})")
    return dict(zip(group_names, (int(w) for w in widths)))


def supports_channel_multiple(name: str) -> bool:
    """Whether family ``name`` can round its seed's widths to a channel multiple."""
    return name in FAMILIES and FAMILIES[name].align is not None


__all__ = ["CEILINGS", "FAMILIES", "MOBILENET_V1_AUTHORS_MAX_WIDTHS", "Family", "build_seed", "get_family",
           "make_divisible", "seed_options", "supports_channel_multiple", "width_ceilings"]
