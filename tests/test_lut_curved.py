"""The LUT against a CURVED cost (not affine in MACs), and marginals of the real neuron groups.

With an affine cost every edge slope of the table is the same, so a slope taken from the wrong end of the
grid, or a wrong interpolation weight, goes unseen. Here the expected values are computed by hand from the
cost at the grid points: bilinear inside a cell, the slope of the LAST measured cell beyond the maximum and
of the FIRST beyond the minimum. Marginals come from the real hwsplit.network.graph.find_neuron_groups and are
checked against finite differences of ``total`` on the network one channel wider.
"""

from __future__ import annotations

import math
import warnings

import pytest

from cost_models import get_cost_model
from cost_models.lut import LutExtrapolationWarning
from cost_models.profiling.grid import family_grid
from hwsplit.network.models import build_model, model_from_architecture
from hwsplit.network.specs import LayerSpec

SHAPE = (1, 3, 32, 32)


def curved(s: LayerSpec) -> float:
    """Increasing in the channels, concave in MACs, with a per-output-element term: far from bilinear."""
    return 0.004 + 1e-6 * s.macs ** 0.8 + 1e-4 * math.sqrt(s.batch * s.out_channels * s.out_height * s.out_width)


def profile_of(cost, specs) -> dict:
    from test_lut import synthetic_profile

    return synthetic_profile(cost, specs)


@pytest.fixture(scope="module")
def lut():
    return get_cost_model("lut", profile=profile_of(curved, family_grid()))


def pw(ci: int, co: int, hw: int = 4) -> LayerSpec:
    return LayerSpec("pwconv", ci, co, height=hw, width=hw)


def dw(c: int, hw: int = 4, stride: int = 1) -> LayerSpec:
    return LayerSpec("dwconv", c, c, kernel=3, stride=stride, groups=c, height=hw, width=hw)


def test_off_grid_is_bilinear_in_the_measured_corners(lut):
    # pwconv 4x4 grid: in 16..512, out 24..512; (100, 150) lies in the cell [96, 128] x [128, 192]
    t, u = (100 - 96) / 32, (150 - 128) / 64
    want = ((1 - t) * ((1 - u) * curved(pw(96, 128)) + u * curved(pw(96, 192)))
            + t * ((1 - u) * curved(pw(128, 128)) + u * curved(pw(128, 192))))
    assert lut.layer_cost(pw(100, 150)) == pytest.approx(want, rel=1e-12)
    # and depthwise is linear in c between measured counts (4x4: 24..512)
    c0, c1 = 64, 96
    want_dw = curved(dw(c0)) + (curved(dw(c1)) - curved(dw(c0))) * (80 - c0) / (c1 - c0)
    assert lut.layer_cost(dw(80)) == pytest.approx(want_dw, rel=1e-12)
    # the interpolation error against the true (curved) cost is small but not zero: what the grid costs
    err = abs(lut.layer_cost(pw(100, 150)) / curved(pw(100, 150)) - 1)
    assert 1e-5 < err < 0.02, err


def test_extrapolation_uses_the_slope_of_the_nearest_cell(lut):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LutExtrapolationWarning)
        # above: in_channels 600 > 512 at out 256: slope of the last cell [384, 512]
        slope_hi = (curved(pw(512, 256)) - curved(pw(384, 256))) / (512 - 384)
        assert lut.layer_cost(pw(600, 256)) == pytest.approx(curved(pw(512, 256)) + slope_hi * 88, rel=1e-12)
        # out_channels above its maximum, likewise
        slope_hi_o = (curved(pw(128, 512)) - curved(pw(128, 384))) / 128
        assert lut.layer_cost(pw(128, 700)) == pytest.approx(curved(pw(128, 512)) + slope_hi_o * 188, rel=1e-12)
        # below: in_channels 10 < 16 at out 64: slope of the first cell [16, 24]
        slope_lo = (curved(pw(24, 64)) - curved(pw(16, 64))) / 8
        assert lut.layer_cost(pw(10, 64)) == pytest.approx(curved(pw(16, 64)) - slope_lo * 6, rel=1e-12)
        # depthwise above 512 at 4x4: the cell [384, 512]
        slope_dw = (curved(dw(512)) - curved(dw(384))) / 128
        assert lut.layer_cost(dw(640)) == pytest.approx(curved(dw(512)) + slope_dw * 128, rel=1e-12)
        # beyond the corner: both edge slopes plus the corner cell's cross term
        i0, i1, o0, o1 = 384, 512, 384, 512
        cross = (curved(pw(i1, o1)) - curved(pw(i0, o1)) - curved(pw(i1, o0)) + curved(pw(i0, o0))) / (128 * 128)
        s_i = (curved(pw(512, 512)) - curved(pw(384, 512))) / 128
        s_o = (curved(pw(512, 512)) - curved(pw(512, 384))) / 128
        want = curved(pw(512, 512)) + s_i * 88 + s_o * 88 + max(cross, 0.0) * 88 * 88
        assert lut.layer_cost(pw(600, 600)) == pytest.approx(want, rel=1e-12)
    # the two ends really differ for this cost, so the checks above can tell them apart
    first = (curved(pw(24, 256)) - curved(pw(16, 256))) / 8
    assert abs(first / slope_hi - 1) > 0.2


def _one_wider(model, name: str):
    """The architecture with one more output channel in the group whose producer is ``name``."""
    arch = model.spec.to_dict()
    if name == "stem.conv":
        arch["stem_width"] += 1
    else:
        i = int(name.split(".")[1])
        arch["widths"][i] += 1
    return model_from_architecture(arch).eval()


@pytest.mark.filterwarnings("ignore::cost_models.lut.LutExtrapolationWarning")
@pytest.mark.parametrize("config", ["cifar_seed", "standard"])
def test_marginals_of_the_real_groups_are_finite_differences_of_the_total(lut, config):
    model = build_model("mobilenet_v1", config=config, resolution=32, num_classes=10).eval()
    marginal = lut.marginal(model, SHAPE)  # the real find_neuron_groups (no fake in this file)
    assert len(marginal) == 1 + len(model.spec.widths)
    base = lut.total(model, SHAPE)
    for name, value in marginal.items():
        fd = lut.total(_one_wider(model, name), SHAPE) - base
        assert value == pytest.approx(fd, rel=1e-9, abs=1e-12), name
        assert value > 0
    # a channel costs more where the feature map is larger
    assert marginal["stem.conv"] > marginal[f"blocks.{len(model.spec.widths) - 2}.pw.conv"]


def test_marginals_are_scaled_by_the_calibration():
    """With measured networks in the profile, marginals are scale · Δ(layer sum): still Δ total."""
    from test_lut import synthetic_profile

    profile = synthetic_profile(curved, family_grid())
    nets = []
    for config in ("cifar_seed", "standard", "tiny_seed"):
        m = build_model("mobilenet_v1", config=config, resolution=32, num_classes=10)
        value = 1.7 * get_cost_model("lut", profile=profile, calibrate=False).layer_sum(m, SHAPE)
        nets.append({"architecture": m.spec.to_dict(), "input_shape": list(SHAPE),
                     "latency_ms": {"median": value, "p25": value, "p75": value, "n": 5}})
    profile["networks"] = nets
    lut = get_cost_model("lut", profile=profile)
    assert lut.calibration.scale == pytest.approx(1.7, rel=1e-9)
    model = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10).eval()
    marginal = lut.marginal(model, SHAPE)
    base = lut.total(model, SHAPE)
    for name in ("stem.conv", "blocks.3.pw.conv"):
        fd = lut.total(_one_wider(model, name), SHAPE) - base
        assert marginal[name] == pytest.approx(fd, rel=1e-9)


@pytest.mark.filterwarnings("ignore::cost_models.lut.LutExtrapolationWarning")
def test_in_context_marginals_include_the_network_terms():
    """With a shipped in-context profile, a marginal is the finite difference of ``total`` — the weight
    memory term (a whole-network term) included — wherever that difference is positive (inside a
    channel block it is 0 and the MACs prior prices it instead)."""
    from pathlib import Path

    from hwsplit.network.graph import layer_specs

    path = Path(__file__).resolve().parents[1] / "profiles" / "cpu-intel-xeon-1t-onnxruntime.json"
    lut = get_cost_model("lut", profile=path)
    model = build_model("mobilenet_v1", config="standard", resolution=32, num_classes=10).eval()
    assert lut.network_term(layer_specs(model, SHAPE)) > 0  # its weights spill out of the cache
    marginal = lut.marginal(model, SHAPE)
    base = lut.total(model, SHAPE)
    checked = 0
    for name, value in marginal.items():
        fd = lut.total(_one_wider(model, name), SHAPE) - base
        if fd > 1e-9:
            assert value == pytest.approx(fd, rel=1e-9), name
            checked += 1
    assert checked >= 1
