"""Energy/latency predictor: held-out accuracy, a positive and sensible marginal, sklearn API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone

import hwsplit.network.graph
from cost_models import get_cost_model
from cost_models.predictor import (
    SPEC_COLUMNS,
    TERMS,
    EnergyPredictorCostModel,
    LayerRegressor,
    fit_report,
    profile_targets,
)
from cost_models.profile_io import SCHEMA, load_profile, save_profile
from cost_models.profiling.grid import family_grid
from hwsplit.network.graph import layer_specs
from hwsplit.network.models import build_model
from hwsplit.network.specs import LAYER_KINDS, LayerSpec

SHAPE = (1, 3, 32, 32)
PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.json"))
PER_MAC = {"conv": 2e-8, "dwconv": 6e-8, "pwconv": 1.2e-8, "linear": 1e-8}


def smooth_latency_ms(s: LayerSpec) -> float:
    """A known smooth cost: fixed + per-MAC (kind-dependent) + memory traffic terms."""
    out = s.batch * s.out_channels * s.out_height * s.out_width
    inp = s.batch * s.in_channels * s.height * s.width
    return 0.004 + PER_MAC[s.kind] * s.macs + 4e-7 * out + 2e-7 * inp


def synthetic_profile(specs, *, noise: float = 0.03, seed: int = 0, energy: bool = True,
                      overhead_ms: float = 0.01) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for spec in specs:
        latency = smooth_latency_ms(spec) * (1 + noise * rng.standard_normal()) + overhead_ms
        row = {"layer": spec.to_dict(), "latency_ms": {"median": latency, "p25": latency, "p75": latency, "n": 9}}
        if energy:  # ~60 W while running, its own noise
            e = 60.0 * smooth_latency_ms(spec) * (1 + noise * rng.standard_normal()) + 60.0 * overhead_ms
            row["energy_mj"] = {"median": e, "p25": e, "p75": e, "n": 3}
        rows.append(row)
    overhead = {"latency_ms": {"median": overhead_ms, "p25": overhead_ms, "p75": overhead_ms, "n": 9}}
    if energy:
        overhead["energy_mj"] = {"median": 60.0 * overhead_ms, "p25": 0.6, "p75": 0.6, "n": 3}
    return {"schema": SCHEMA, "device": {"name": "synthetic GPU"}, "backend": "onnxruntime",
            "meter": "nvml" if energy else "latency", "batch": 1, "created": "2025-01-01T00:00:00+00:00",
            "overhead": overhead, "rows": rows}


from test_lut import fake_find_neuron_groups  # noqa: E402  (the same fake MobileNetV1 groups)


@pytest.fixture
def fake_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hwsplit.network.graph, "find_neuron_groups", fake_find_neuron_groups, raising=False)


@pytest.fixture(scope="module")
def profile() -> dict:
    return synthetic_profile(family_grid())


# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["latency_ms", "energy_mj"])
def test_held_out_accuracy_on_a_synthetic_profile(profile: dict, metric: str) -> None:
    report = fit_report(profile, metric, test_size=0.25, seed=0)
    n = len(profile["rows"])
    assert report["n_train"] + report["n_test"] == n and report["n_test"] == pytest.approx(n / 4, abs=1)
    assert report["r2"] > 0.98
    assert report["within_10pct"] > 0.9
    assert report["rmspe"] < 0.06
    assert report["unit"] == ("ms" if metric == "latency_ms" else "mJ")
    assert fit_report(profile, metric, test_size=0.25, seed=0) == report  # deterministic
    json.dumps(report)


def test_fit_report_errors(profile: dict) -> None:
    latency_only = synthetic_profile(family_grid(quick=True), energy=False)
    with pytest.raises(ValueError, match="has no energy_mj.*--meter nvml"):
        fit_report(latency_only, "energy_mj")
    with pytest.raises(ValueError, match="test_size"):
        fit_report(profile, "latency_ms", test_size=1.5)
    with pytest.raises(ValueError, match="metric"):
        fit_report(profile, "watts")


def test_regressor_sklearn_api(profile: dict) -> None:
    specs, y, overhead = profile_targets(profile, "latency_ms")
    assert overhead == pytest.approx(0.01) and np.all(y > 0)
    reg = LayerRegressor(alpha=1e-4)
    assert reg.get_params()["alpha"] == 1e-4 and clone(reg).get_params() == reg.get_params()
    with pytest.raises(ValueError, match="not fitted"):
        reg.predict(specs[:2])
    assert reg.fit(specs, y) is reg
    assert set(reg.coef_) == set(LAYER_KINDS) and reg.n_samples_ == len(specs)
    coefficients = reg.coefficients()
    assert all(isinstance(v, float) and v >= 0 for c in coefficients.values() for v in c.values())
    assert set(coefficients["pwconv"]) == set(TERMS)
    assert all(coefficients[k]["macs"] > 0 for k in LAYER_KINDS)
    assert reg.score(specs, y) > 0.98
    # profile rows, layer dicts and a numeric array with SPEC_COLUMNS are accepted too
    rows = [r for r in profile["rows"]]
    pred = reg.predict(specs[:5])
    np.testing.assert_allclose(reg.predict(rows[:5]), pred)
    np.testing.assert_allclose(reg.predict([r["layer"] for r in rows[:5]]), pred)
    array = np.array([[LAYER_KINDS.index(s.kind), s.in_channels, s.out_channels, s.kernel, s.stride, s.groups,
                       s.height, s.width, s.batch] for s in specs[:5]])
    assert array.shape[1] == len(SPEC_COLUMNS)
    np.testing.assert_allclose(reg.predict(array), pred)
    # refitting gives the same numbers: nothing to pickle
    assert LayerRegressor(alpha=1e-4).fit(specs, y).coefficients() == coefficients


def test_regressor_validates_inputs() -> None:
    specs = [LayerSpec("pwconv", 8, 8, height=4, width=4), LayerSpec("pwconv", 16, 8, height=4, width=4)]
    with pytest.raises(ValueError, match="y"):
        LayerRegressor().fit(specs, [1.0])
    with pytest.raises(ValueError, match="y"):
        LayerRegressor().fit(specs, [1.0, -1.0])
    with pytest.raises(ValueError, match="y"):
        LayerRegressor().fit(specs, [1.0, float("nan")])
    with pytest.raises(ValueError, match="X"):
        LayerRegressor().fit([], [])
    with pytest.raises(ValueError, match=r"X\[1\]"):
        LayerRegressor().fit([specs[0], 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        LayerRegressor(alpha=-1).fit(specs, [1.0, 2.0])
    # an unseen kind falls back to the pooled model, still positive
    reg = LayerRegressor().fit(specs, [1.0, 2.0])
    assert reg.predict([LayerSpec("linear", 64, 10)])[0] > 0


def test_energy_cost_model_metric_resolution(profile: dict, tmp_path: Path) -> None:
    model = get_cost_model("energy", profile=profile)
    assert isinstance(model, EnergyPredictorCostModel)
    assert model.metric == "energy_mj" and model.unit == "mJ" and model.overhead == pytest.approx(0.6)
    latency = get_cost_model("energy", profile=profile, metric="latency_ms")
    assert latency.unit == "ms"
    path = tmp_path / "cpu.json"
    save_profile(synthetic_profile(family_grid(quick=True), energy=False), path)
    with pytest.raises(ValueError, match="has no energy_mj") as err:
        get_cost_model("energy", profile=path)
    assert str(path) in str(err.value) and "--meter nvml" in str(err.value)
    assert get_cost_model("energy", profile=path, metric="latency_ms").unit == "ms"
    with pytest.raises(ValueError, match="metric"):
        get_cost_model("energy", profile=path, metric="flops")


def test_energy_total_and_monotone_layer_costs(profile: dict) -> None:
    model = get_cost_model("energy", profile=profile)
    seed = build_model("mobilenet_v1", config="cifar_seed", resolution=32, num_classes=10)
    specs = layer_specs(seed, SHAPE)
    assert model.total(seed, SHAPE) == pytest.approx(model.overhead + sum(model.layer_cost(s) for s in specs))
    truth = 60.0 * sum(smooth_latency_ms(s) for s in specs) + model.overhead
    assert model.total(seed, SHAPE) == pytest.approx(truth, rel=0.1)
    rng = np.random.default_rng(0)
    for spec in rng.choice(family_grid(), 50, replace=False):
        if spec.kind == "dwconv":
            c = spec.in_channels + 1
            wider = [spec.replace(in_channels=c, out_channels=c, groups=c)]
        else:
            wider = [spec.replace(out_channels=spec.out_channels + 1), spec.replace(in_channels=spec.in_channels + 1)]
        for w in wider:
            assert model.layer_cost(w) > model.layer_cost(spec)


@pytest.mark.usefixtures("fake_groups")
def test_energy_marginal_positive_and_larger_at_higher_resolution(profile: dict) -> None:
    model = get_cost_model("energy", profile=profile)
    for config in ("cifar_seed", "standard"):
        net = build_model("mobilenet_v1", config=config, resolution=32, num_classes=10)
        marginal = model.marginal(net, SHAPE)
        assert len(marginal) == 14 and all(v > 0 for v in marginal.values())
        assert marginal["stem.conv"] > marginal["blocks.12.pw.conv"]
        assert marginal["blocks.0.pw.conv"] > marginal["blocks.10.pw.conv"]


@pytest.mark.skipif(not PROFILES, reason="no shipped profile in profiles/ yet")
@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_shipped_profile_predictor(path: Path) -> None:
    data = load_profile(path)
    metrics = [m for m in ("latency_ms", "energy_mj") if any(m in r for r in data["rows"])]
    for metric in metrics:
        report = fit_report(path, metric)
        # a sanity floor for any shipped profile (isolated rows; BENCHMARKS.md, issue 28, has each one's figures)
        assert report["r2"] > 0.75, report
        assert report["within_10pct"] > 0.3, report
