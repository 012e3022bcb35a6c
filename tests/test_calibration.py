"""Calibrating layer sums to whole networks measured end to end."""

from __future__ import annotations

import pytest
from test_lut import SHAPE, affine_cost, synthetic_profile

from cost_models import get_cost_model
from cost_models.profiling.grid import calibration_architectures, family_grid
from hwsplit.network.models import model_from_architecture


def _with_networks(profile: dict, measured) -> dict:
    """Add end-to-end 'measurements' measured(layer_sum) of 12 calibration networks."""
    plain = get_cost_model("lut", profile=profile)
    nets = []
    for arch in calibration_architectures("mobilenet_v1", 32, 12):
        model = model_from_architecture(arch)
        value = measured(plain.layer_sum(model, SHAPE))
        nets.append({"architecture": arch, "input_shape": list(SHAPE),
                     "latency_ms": {"median": value, "p25": value, "p75": value, "n": 10}})
    return {**profile, "networks": nets}


@pytest.fixture(scope="module")
def base_profile() -> dict:
    return synthetic_profile(affine_cost, family_grid(), overhead=0.01)


@pytest.mark.parametrize("name, options", [("lut", {}), ("energy", {"metric": "latency_ms"})])
def test_scale_and_offset_are_recovered_and_applied(base_profile, name, options):
    profile = _with_networks(base_profile, lambda s: 1.4 * s + 0.05)
    plain = get_cost_model(name, profile=base_profile, **options)
    cal = get_cost_model(name, profile=profile, **options)
    if name == "lut":
        assert cal.calibration.scale == pytest.approx(1.4, rel=1e-6)
        assert cal.calibration.offset == pytest.approx(0.05, rel=1e-4)
        assert cal.calibration.rmspe_after < 1e-6
    else:  # the regressor's layer sums differ slightly from the table's; the fit absorbs the same trend
        assert cal.calibration.scale == pytest.approx(1.4, rel=0.1)
    model = model_from_architecture(calibration_architectures("mobilenet_v1", 32, 3, seed=7)[1])
    c = cal.calibration
    assert cal.total(model, SHAPE) == pytest.approx(c.scale * plain.total(model, SHAPE) + c.offset)
    spec = family_grid()[10]
    assert cal.layer_cost(spec) == plain.layer_cost(spec)  # per-layer values stay what was measured


def test_marginals_are_scaled_so_the_ranking_is_unchanged(base_profile):
    profile = _with_networks(base_profile, lambda s: 1.5 * s)
    plain = get_cost_model("lut", profile=base_profile)
    cal = get_cost_model("lut", profile=profile)
    model = model_from_architecture(calibration_architectures("mobilenet_v1", 32, 1)[0])
    a, b = plain.marginal(model, SHAPE), cal.marginal(model, SHAPE)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(1.5 * a[k], rel=1e-6)


def test_no_networks_or_calibrate_false_is_the_plain_layer_sum(base_profile):
    profile = _with_networks(base_profile, lambda s: 2.0 * s)
    assert get_cost_model("lut", profile=base_profile).calibration.scale == 1.0
    assert get_cost_model("lut", profile=profile, calibrate=False).calibration.scale == 1.0


def test_calibration_architectures_span_the_family_deterministically():
    a = calibration_architectures("mobilenet_v1", 32, 8)
    assert a == calibration_architectures("mobilenet_v1", 32, 8)
    sizes = [sum(x["widths"]) for x in a]
    assert sizes == sorted(sizes) or max(sizes) > 4 * min(sizes)
    for arch in a:
        assert all(8 <= w <= 1024 for w in arch["widths"])
        model_from_architecture(arch)  # valid
