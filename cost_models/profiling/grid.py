"""The family's layer grid and its random networks (docs/design.md §6).

:func:`family_grid` lists every layer (a :class:`~hwsplit.network.specs.LayerSpec`) the family can take while
it grows, from the CIFAR seed's widths to the standard MobileNetV1 widths, over a geometric channel
ladder; :func:`calibration_architectures` draws whole random networks of the family between the same
bounds (the profiler measures them end to end).
"""

from __future__ import annotations

from typing import Any

from hwsplit.network.families import make_divisible  # one rounding rule for seeds, baselines and the bench
from hwsplit.network.specs import LayerSpec

__all__ = ["CHANNEL_LADDER", "FAMILIES", "aligned_architecture", "calibration_architectures", "family_grid",
           "make_divisible"]

FAMILIES = ("mobilenet_v1",)
#: Channel counts measured: geometric, alternating ×1.5 and ×4/3 (≈ √2 per step).
CHANNEL_LADDER = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def _ladder(lo: int, hi: int, quick: bool) -> list[int]:
    """Channel counts covering [lo, hi]: the ladder from the rung at or below ``lo`` up to ``hi``
    (``hi`` itself always included); ``quick`` keeps only the two ends."""
    if lo >= hi:
        return [hi]
    if quick:
        return [lo, hi]
    start = max([c for c in CHANNEL_LADDER if c <= lo], default=lo)
    values = {c for c in CHANNEL_LADDER if start <= c <= hi} | {start, hi}
    return sorted(values)


def _family_positions(family: str, resolution: int, num_classes: int) -> list[dict[str, Any]]:
    """Every layer position of the family with the range of channels it can take while growing:
    from the CIFAR seed's widths to the standard MobileNetV1 widths at the same position."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD

    seed, full = MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD
    if [s for _, s in seed["blocks"]] != [s for _, s in full["blocks"]]:  # pragma: no cover - data invariant
        raise ValueError("family: seed and standard MobileNetV1 strides differ")
    stem_stride = 2 if resolution >= 64 else 1
    positions: list[dict[str, Any]] = []
    h = resolution
    positions.append({"kind": "conv", "kernel": 3, "stride": stem_stride, "height": h, "cin": (3, 3),
                      "cout": (seed["stem"], full["stem"])})
    h = (h + 2 - 3) // stem_stride + 1
    prev = (seed["stem"], full["stem"])
    for (w_lo, stride), (w_hi, _) in zip(seed["blocks"], full["blocks"]):
        positions.append({"kind": "dwconv", "kernel": 3, "stride": stride, "height": h, "cin": prev, "cout": prev})
        h = (h + 2 - 3) // stride + 1
        positions.append({"kind": "pwconv", "kernel": 1, "stride": 1, "height": h, "cin": prev,
                          "cout": (w_lo, w_hi)})
        prev = (w_lo, w_hi)
    positions.append({"kind": "linear", "kernel": 1, "stride": 1, "height": 1, "cin": prev,
                      "cout": (num_classes, num_classes)})
    return positions


def family_grid(family: str = "mobilenet_v1", resolution: int = 32, *, quick: bool = False,
                num_classes: int = 10, batch: int = 1) -> list[LayerSpec]:
    """The LayerSpecs to measure for ``family`` at ``resolution``: for every (kind, kernel, stride,
    feature-map size) the family has, the union over its positions of the channel ladder between
    the seed's and the standard network's widths. Sorted by kind, geometry and channels."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    specs: set[LayerSpec] = set()
    for pos in _family_positions(family, resolution, num_classes):
        kind, k, s, h = pos["kind"], pos["kernel"], pos["stride"], pos["height"]
        if kind == "dwconv":
            lo, hi = min(pos["cin"]), max(pos["cin"])
            for c in _ladder(lo, hi, quick):
                specs.add(LayerSpec(kind=kind, in_channels=c, out_channels=c, kernel=k, stride=s, groups=c,
                                    height=h, width=h, batch=batch))
            continue
        for ci in _ladder(*pos["cin"], quick):
            for co in _ladder(*pos["cout"], quick):
                if kind == "linear":
                    specs.add(LayerSpec(kind=kind, in_channels=ci, out_channels=co, batch=batch, bias=True))
                else:
                    specs.add(LayerSpec(kind=kind, in_channels=ci, out_channels=co, kernel=k, stride=s,
                                        height=h, width=h, batch=batch))
    order = {"conv": 0, "dwconv": 1, "pwconv": 2, "linear": 3}
    return sorted(specs, key=lambda sp: (order[sp.kind], -sp.height, sp.stride, sp.in_channels, sp.out_channels))


def calibration_architectures(family: str, resolution: int, n: int, *, num_classes: int = 10,
                              activation: str = "silu", seed: int = 20191007) -> list[dict[str, Any]]:
    """``n`` random architectures of ``family``: each layer's width drawn log-uniformly between the
    CIFAR seed's and the standard network's (one size level per network plus per-layer jitter, so
    the set spans small to large networks). Deterministic in ``seed``."""
    import math

    import numpy as np

    from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    lo = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    hi = [MOBILENET_V1_STANDARD["stem"]] + [w for w, _ in MOBILENET_V1_STANDARD["blocks"]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        level = (i + rng.uniform()) / n  # stratified over sizes
        widths = [int(round(math.exp(math.log(a) + float(np.clip(level + rng.normal(0, 0.15), 0, 1))
                                     * (math.log(b) - math.log(a))))) for a, b in zip(lo, hi)]
        out.append({"family": "mobilenet_v1", "stem_width": widths[0], "widths": widths[1:],
                    "strides": [st for _, st in MOBILENET_V1_CIFAR_SEED["blocks"]],
                    "stem_stride": 1 if resolution < 64 else 2, "num_classes": num_classes, "in_channels": 3,
                    "activation": activation, "dropout": 0.0})
    return out



def growth_architectures(family: str, resolution: int, n: int, *, num_classes: int = 10, activation: str = "silu",
                         seed: int = 20261207) -> list[dict[str, Any]]:
    """``n`` random architectures shaped the way growth shapes them: the CIFAR seed's widths, layer i
    multiplied by ``1 + (G - 1) · (i / L)^p`` (jittered ±15 %), with G drawn log-uniformly in [1, 12]
    and p in [0.3, 3] — early layers stay near the seed, late ones grow most, up to 12×. Deterministic
    in ``seed``."""
    import math

    import numpy as np

    from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    base = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        growth, power = math.exp(rng.uniform(0.0, math.log(12.0))), rng.uniform(0.3, 3.0)
        widths = [max(1, int(round(w * (1 + (growth - 1) * (i / (len(base) - 1)) ** power)
                                   * math.exp(rng.normal(0, 0.15))))) for i, w in enumerate(base)]
        out.append({"family": "mobilenet_v1", "stem_width": widths[0], "widths": widths[1:],
                    "strides": [st for _, st in MOBILENET_V1_CIFAR_SEED["blocks"]],
                    "stem_stride": 1 if resolution < 64 else 2, "num_classes": num_classes, "in_channels": 3,
                    "activation": activation, "dropout": 0.0})
    return out


def aligned_architecture(arch: dict[str, Any], multiple: int) -> dict[str, Any]:
    """``arch`` with its stem and block widths made divisible by ``multiple`` (:func:`make_divisible`)."""
    return {**arch, "stem_width": make_divisible(arch["stem_width"], multiple),
            "widths": [make_divisible(w, multiple) for w in arch["widths"]]}
