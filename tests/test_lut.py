"""Lookup-table cost model: exact on the grid, monotone between, extrapolation, totals, marginals."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import hwsplit.network.graph
from cost_models import get_cost_model
from cost_models.lut import LookupTableCostModel, LutExtrapolationWarning
from cost_models.profile_io import SCHEMA, load_profile, save_profile
from cost_models.profiling.grid import family_grid
from cost_models.profiling.profiler import profile_family
from hwsplit.network.graph import layer_specs
from hwsplit.network.models import build_model
from hwsplit.network.specs import LayerSpec

SHAPE = (1, 3, 32, 32)
PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.json"))


def synthetic_profile(cost, specs, *, overhead: float = 0.0, metrics=("latency_ms",), noise: float = 0.0,
                      seed: int = 0) -> dict:
    """A valid profile whose rows are ``cost(spec)`` (+ relative noise) + ``overhead``."""
    rng = np.random.default_rng(seed)
    rows = []
    for spec in specs:
        row = {"layer": spec.to_dict()}
        for metric in metrics:
            value = cost(spec) * (1.0 + noise * rng.standard_normal()) + overhead
            row[metric] = {"median": value, "p25": 0.95 * value, "p75": 1.05 * value, "n": 20}
        rows.append(row)
    stats = {"median": overhead, "p25": overhead, "p75": overhead, "n": 20}
    return {"schema": SCHEMA, "device": {"name": "synthetic"}, "backend": "onnxruntime",
            "meter": "nvml" if "energy_mj" in metrics else "latency", "batch": 1,
            "created": "2025-01-01T00:00:00+00:00", "family": "mobilenet_v1", "resolution": 32,
            "overhead": {m: dict(stats) for m in metrics}, "rows": rows}


def out_elems(s: LayerSpec) -> int:
    return s.batch * s.out_channels * s.out_height * s.out_width


def affine_cost(s: LayerSpec) -> float:
    """Affine in MACs and output elements: bilinear interpolation reproduces it exactly."""
    return 0.003 + 2e-8 * s.macs + 3e-7 * out_elems(s)


def curved_cost(s: LayerSpec) -> float:
    """Smooth, increasing and not bilinear in the channels."""
    return 0.004 + 1e-6 * s.macs ** 0.8 + 1e-4 * math.sqrt(out_elems(s))


def fake_find_neuron_groups(model, example):
    """Neuron groups of a MobileNetV1 (stem and every pointwise conv), shaped like hwsplit.network.graph's."""
    groups, prev = [], "stem.conv"
    for i in range(len(model.blocks)):
        groups.append(SimpleNamespace(name=prev, producer=prev, splittable=True, depthwise=[f"blocks.{i}.dw.conv"],
                                      consumers=[SimpleNamespace(name=f"blocks.{i}.pw.conv", columns=1)]))
        prev = f"blocks.{i}.pw.conv"
    groups.append(SimpleNamespace(name=prev, producer=prev, splittable=True, depthwise=[],
                                  consumers=[SimpleNamespace(name="classifier", columns=1)]))
    return groups


@pytest.fixture
def fake_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hwsplit.network.graph, "find_neuron_groups", fake_find_neuron_groups, raising=False)


@pytest.fixture(scope="module")
def grid() -> list[LayerSpec]:
    return family_grid()


# -------------------------------------------------------------------------------------------------

def test_exact_on_grid_points(grid: list[LayerSpec]) -> None:
    lut = get_cost_model("lut", profile=synthetic_profile(curved_cost, grid, overhead=0.01))
    assert isinstance(lut, LookupTableCostModel) and lut.unit == "ms" and lut.overhead == pytest.approx(0.01)
    for spec in grid:
        assert lut.layer_cost(spec) == pytest.approx(curved_cost(spec), rel=1e-9)


def test_bilinear_reproduces_affine_costs_off_grid(grid: list[LayerSpec]) -> None:
    lut = get_cost_model("lut", profile=synthetic_profile(affine_cost, grid))
    queries = [LayerSpec("pwconv", 37, 77, height=8, width=8), LayerSpec("pwconv", 700, 1000, height=2, width=2),
               LayerSpec("dwconv", 50, 50, kernel=3, stride=2, groups=50, height=32, width=32),
               LayerSpec("conv", 3, 29, kernel=3, height=32, width=32), LayerSpec("linear", 333, 10, bias=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for spec in queries:
            assert lut.layer_cost(spec) == pytest.approx(affine_cost(spec), rel=1e-9)


def test_monotone_between_grid_points(grid: list[LayerSpec]) -> None:
    lut = get_cost_model("lut", profile=synthetic_profile(curved_cost, grid))
    cins, couts = range(16, 513, 7), range(24, 513, 11)
    table = np.array([[lut.layer_cost(LayerSpec("pwconv", ci, co, height=4, width=4)) for co in couts]
                      for ci in cins])
    assert np.all(np.diff(table, axis=0) >= 0) and np.all(np.diff(table, axis=1) >= 0)
    assert np.all(np.diff(table, axis=0).sum(axis=0) > 0)
    dw = [lut.layer_cost(LayerSpec("dwconv", c, c, kernel=3, groups=c, height=2, width=2)) for c in range(32, 1025)]
    assert np.all(np.diff(dw) >= 0) and dw[-1] > dw[0]
    # interpolated values stay within the measured neighbours
    lo = curved_cost(LayerSpec("pwconv", 128, 128, height=4, width=4))
    hi = curved_cost(LayerSpec("pwconv", 192, 192, height=4, width=4))
    assert lo <= lut.layer_cost(LayerSpec("pwconv", 150, 170, height=4, width=4)) <= hi


def test_scattered_rows_still_interpolate_monotonically() -> None:
    # a grid with holes (as left by an interrupted profile): no full cell around most queries
    channels = (8, 16, 32, 64, 128)
    specs = [LayerSpec("pwconv", ci, co, height=8, width=8) for ci in channels for co in channels
             if (ci * co) % 3 != 1]
    lut = get_cost_model("lut", profile=synthetic_profile(curved_cost, specs))
    for spec in specs:
        assert lut.layer_cost(spec) == pytest.approx(curved_cost(spec))
    line = [lut.layer_cost(LayerSpec("pwconv", 40, co, height=8, width=8)) for co in range(8, 129)]
    assert np.all(np.diff(line) >= -1e-12) and line[-1] > line[0]


def test_extrapolation_warns_once_and_strict_raises(grid: list[LayerSpec]) -> None:
    profile = synthetic_profile(affine_cost, grid)
    lut = get_cost_model("lut", profile=profile)
    at_max = lut.layer_cost(LayerSpec("pwconv", 1024, 1024, height=2, width=2))
    with pytest.warns(LutExtrapolationWarning, match="in_channels=1100 above the measured maximum 1024"):
        above = lut.layer_cost(LayerSpec("pwconv", 1100, 1024, height=2, width=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        further = lut.layer_cost(LayerSpec("pwconv", 1200, 1024, height=2, width=2))
    assert not caught, "one warning per geometry and direction"
    assert at_max < above < further
    # linear from the edge cell: a cost affine in MACs and output elements is extrapolated exactly
    assert above == pytest.approx(affine_cost(LayerSpec("pwconv", 1100, 1024, height=2, width=2)), rel=1e-6)
    with pytest.warns(LutExtrapolationWarning, match="below the measured minimum"):
        small = lut.layer_cost(LayerSpec("pwconv", 4, 8, height=32, width=32))
    assert 0 < small < lut.layer_cost(LayerSpec("pwconv", 8, 8, height=32, width=32))
    both = LayerSpec("pwconv", 1300, 1500, height=2, width=2)
    dw = LayerSpec("dwconv", 1500, 1500, kernel=3, groups=1500, height=2, width=2)
    stem = LayerSpec("conv", 4, 32, kernel=3, height=32, width=32)  # one measured in_channels: per-MAC slope
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LutExtrapolationWarning)
        assert lut.layer_cost(both) == pytest.approx(affine_cost(both), rel=1e-6)  # bilinear beyond the corner
        assert lut.layer_cost(dw) == pytest.approx(affine_cost(dw), rel=1e-6)
        assert lut.layer_cost(stem) > lut.layer_cost(LayerSpec("conv", 3, 32, kernel=3, height=32, width=32))
    strict = get_cost_model("lut", profile=profile, strict=True)
    with pytest.raises(ValueError, match="above the measured maximum") as err:
        strict.layer_cost(LayerSpec("pwconv", 1100, 1024, height=2, width=2))
    assert "strict" in str(err.value)
    assert strict.layer_cost(LayerSpec("pwconv", 100, 100, height=2, width=2)) > 0  # inside: fine


def test_unmeasured_geometry_is_priced_from_the_nearest(grid: list[LayerSpec]) -> None:
    profile = synthetic_profile(affine_cost, grid)
    lut = get_cost_model("lut", profile=profile)
    big = LayerSpec("pwconv", 32, 64, height=64, width=64)
    near = LayerSpec("pwconv", 32, 64, height=32, width=32)
    with pytest.warns(LutExtrapolationWarning, match="not measured"):
        value = lut.layer_cost(big)
    assert value == pytest.approx(lut.layer_cost(near) * big.macs / near.macs)
    with pytest.raises(ValueError, match="not measured"):
        get_cost_model("lut", profile=profile, strict=True).layer_cost(big)
    no_linear = synthetic_profile(affine_cost, [s for s in grid if s.kind != "linear"])
    with pytest.raises(ValueError, match="no linear rows"):
        get_cost_model("lut", profile=no_linear).layer_cost(LayerSpec("linear", 64, 10))


def test_total_is_sum_of_layers_plus_overhead(grid: list[LayerSpec]) -> None:
    lut = get_cost_model("lut", profile=synthetic_profile(curved_cost, grid, overhead=0.02))
    for config in ("cifar_seed", "standard"):
        model = build_model("mobilenet_v1", config=config, resolution=32, num_classes=10)
        specs = layer_specs(model, SHAPE)
        total = lut.total(model, SHAPE)
        assert total == pytest.approx(0.02 + sum(lut.layer_cost(s) for s in specs))
        # every layer of the seed and of the standard network is a grid point: exact costs
        assert total == pytest.approx(0.02 + sum(curved_cost(s) for s in specs))


@pytest.mark.usefixtures("fake_groups")
def test_marginal_is_the_cost_of_one_more_channel(grid: list[LayerSpec]) -> None:
    lut = get_cost_model("lut", profile=synthetic_profile(curved_cost, grid))
    model = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10)
    marginal = lut.marginal(model, SHAPE)
    assert len(marginal) == 14 and all(v > 0 for v in marginal.values())
    specs = {s.name: s for s in layer_specs(model, SHAPE)}
    stem, dw0, pw0 = specs["stem.conv"], specs["blocks.0.dw.conv"], specs["blocks.0.pw.conv"]
    by_hand = (lut.layer_cost(stem.replace(out_channels=9)) - curved_cost(stem)
               + lut.layer_cost(dw0.replace(in_channels=9, out_channels=9, groups=9)) - curved_cost(dw0)
               + lut.layer_cost(pw0.replace(in_channels=9)) - curved_cost(pw0))
    assert marginal["stem.conv"] == pytest.approx(by_hand)
    # one more channel costs more at 32x32 than at 2x2
    assert marginal["stem.conv"] > marginal["blocks.12.pw.conv"]
    assert marginal["blocks.0.pw.conv"] > marginal["blocks.10.pw.conv"]


@pytest.mark.usefixtures("fake_groups")
@pytest.mark.filterwarnings("ignore::cost_models.lut.LutExtrapolationWarning")  # +1 channel past the standard widths
def test_marginal_positive_on_a_noisy_table(grid: list[LayerSpec], caplog: pytest.LogCaptureFixture) -> None:
    noisy = synthetic_profile(curved_cost, grid, noise=0.3, seed=1)
    with caplog.at_level(logging.INFO, logger="cost_models.lut"):
        lut = get_cost_model("lut", profile=noisy)
        assert "decrease with more channels" in caplog.text
        for config in ("cifar_seed", "standard"):
            model = build_model("mobilenet_v1", config=config, resolution=32, num_classes=10)
            marginal = lut.marginal(model, SHAPE)
            assert all(v > 0 for v in marginal.values()), marginal


# Marginals of the real find_neuron_groups, against finite differences of the total: tests/test_lut_curved.py


def test_missing_metric_and_units(grid: list[LayerSpec], tmp_path: Path) -> None:
    latency_only = synthetic_profile(affine_cost, grid[:20])
    path = tmp_path / "cpu.json"
    save_profile(latency_only, path)
    with pytest.raises(ValueError, match="has no energy_mj") as err:
        get_cost_model("lut", profile=path, metric="energy_mj")
    assert str(path) in str(err.value) and "--meter nvml" in str(err.value) and "NVIDIA GPU" in str(err.value)
    with pytest.raises(ValueError, match="metric"):
        get_cost_model("lut", profile=path, metric="joules")
    assert get_cost_model("lut", profile=path).unit == "ms"
    both = synthetic_profile(affine_cost, grid[:20], metrics=("latency_ms", "energy_mj"))
    assert get_cost_model("lut", profile=both, metric="energy_mj").unit == "mJ"
    with pytest.raises(ValueError, match="unknown schema"):
        get_cost_model("lut", profile=dict(latency_only, schema="hwsplit.profile/0"))


def test_lut_from_a_real_measured_profile(tmp_path: Path) -> None:
    layers = [LayerSpec("pwconv", ci, co, height=4, width=4) for ci in (16, 64) for co in (16, 64)]
    path = tmp_path / "real.json"
    profile_family(layers=layers, out=path, time_budget_s=0.01, warmup=2)
    lut = get_cost_model("lut", profile=path)
    assert lut.overhead > 0
    values = [lut.layer_cost(s) for s in layers]
    assert all(v > 0 for v in values)
    assert lut.layer_cost(LayerSpec("pwconv", 32, 32, height=4, width=4)) > 0


@pytest.mark.skipif(not PROFILES, reason="no shipped profile in profiles/ yet")
@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
@pytest.mark.usefixtures("fake_groups")
def test_shipped_profile(path: Path) -> None:
    profile = load_profile(path)
    lut = get_cost_model("lut", profile=path)
    seed = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10)
    assert lut.total(seed, SHAPE) > lut.overhead >= 0
    assert all(v > 0 for v in lut.marginal(seed, SHAPE).values())
    if any("energy_mj" in r for r in profile["rows"]):
        assert get_cost_model("lut", profile=path, metric="energy_mj").total(seed, SHAPE) > 0
