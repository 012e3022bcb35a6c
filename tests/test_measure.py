"""The measurement protocol (cost_models.measure): interleaved rounds, median of round medians,
repeatability recorded, a noisy profile flagged; the default thread count."""

from __future__ import annotations

import logging
import random

import pytest

from cost_models import machine, profiler
from cost_models.measure import NOISE_FLOOR_PCT, measure_interleaved, repeatability_summary
from cost_models.meters import Measurement, Stats
from hwsplit.specs import LayerSpec


class FakeRunner:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sync = None

    def run_once(self) -> None:  # pragma: no cover - the fake meter never runs it
        raise AssertionError


class FakeMeter:
    """Returns ``base_ms[runner] × factor`` per call, the factor drawn by ``noise`` (a round's drift)."""

    name = "latency"
    supports_energy = False
    method = "wallclock"

    def __init__(self, noise: float, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.noise = noise
        self.calls: list[str] = []

    def measure(self, run_once, *, time_budget_s: float, warmup: int, sync=None) -> Measurement:
        name = getattr(getattr(run_once, "__self__", None), "name", "layer")
        self.calls.append(name)
        base = {"a": 1.0, "b": 2.0}.get(name, 0.5)
        value = base * (1.0 + self.rng.uniform(-self.noise, self.noise))
        return Measurement(latency_ms=Stats(median=value, p25=0.9 * value, p75=1.1 * value, n=10))


class ScriptedMeter(FakeMeter):
    def __init__(self, factors: list[float]) -> None:
        super().__init__(0.0)
        self.factors = list(factors)

    def measure(self, run_once, *, time_budget_s: float, warmup: int, sync=None) -> Measurement:
        self.calls.append(run_once.__self__.name)
        value = self.factors.pop(0)
        return Measurement(latency_ms=Stats(median=value, p25=value, p75=value, n=3))


def test_median_of_round_medians_and_spread() -> None:
    meter = ScriptedMeter([1.0, 1.2, 0.9, 1.0, 1.05])
    (m,) = measure_interleaved([FakeRunner("a")], meter, rounds=5, time_budget_s=1.0)
    assert m.latency_ms.median == pytest.approx(1.0)
    assert m.rounds_ms == [1.0, 1.2, 0.9, 1.0, 1.05]
    assert m.spread_pct == pytest.approx(20.0)
    assert m.latency_ms.n == 15
    (single,) = measure_interleaved([FakeRunner("a")], ScriptedMeter([2.0]), rounds=1, time_budget_s=1.0)
    assert single.spread_pct is None and single.latency_ms.median == 2.0


def test_rounds_interleave_every_runner() -> None:
    meter = FakeMeter(0.0)
    runners = [FakeRunner(n) for n in "abcd"]
    ms = measure_interleaved(runners, meter, rounds=3, time_budget_s=0.3)
    assert [m.latency_ms.median for m in ms] == [1.0, 2.0, 0.5, 0.5]
    assert all(m.spread_pct == 0.0 for m in ms)
    for r in range(3):  # each round measures every runner once, the order reshuffled after the first
        assert sorted(meter.calls[4 * r:4 * r + 4]) == list("abcd")
    assert meter.calls[:4] == list("abcd")
    with pytest.raises(ValueError, match="rounds"):
        measure_interleaved(runners, meter, rounds=0, time_budget_s=1.0)


def test_repeatability_summary() -> None:
    s = repeatability_summary([1.0, 2.0, 3.0, None, 10.0])
    assert s == {"n": 4, "median_pct": 2.5, "p90_pct": 10.0, "max_pct": 10.0, "within_threshold": 0.75}
    assert repeatability_summary([None]) == {"n": 0}


def _grid() -> list[LayerSpec]:
    return [LayerSpec("pwconv", 8, 8, height=4, width=4), LayerSpec("pwconv", 16, 8, height=4, width=4),
            LayerSpec("dwconv", 8, 8, kernel=3, groups=8, height=4, width=4)]


@pytest.mark.parametrize("noise, flagged", [(0.0, False), (0.3, True)])
def test_a_profile_from_a_noisy_run_is_flagged(tmp_path, monkeypatch, caplog, noise: float, flagged: bool) -> None:
    meter = FakeMeter(noise)
    monkeypatch.setattr(profiler, "make_meter", lambda *a, **k: meter)
    with caplog.at_level(logging.WARNING, logger="cost_models.profiler"):
        profile = profiler.profile_family(layers=_grid(), out=tmp_path / "p.json", time_budget_s=0.01, warmup=1,
                                          threads=1)
    rep = profile["repeatability"]
    assert rep["rounds"] == 5 and rep["threshold_pct"] == NOISE_FLOOR_PCT and rep["noise_floor_of"] == "layers"
    assert rep["layers"]["n"] == 3 and rep["repeatable"] is (not flagged)
    assert all(len(r["repeat"]["rounds_ms"]) == 5 for r in profile["rows"])
    warned = [r for r in caplog.records if "repeat only within" in r.getMessage()]
    if flagged:
        assert rep["noise_floor_pct"] > NOISE_FLOOR_PCT and len(warned) == 1
    else:
        assert rep["noise_floor_pct"] == 0.0 and not warned


def test_default_threads_is_one_on_a_small_machine(monkeypatch) -> None:
    monkeypatch.setattr(machine, "available_cores", lambda: 2)
    assert machine.default_threads() == 1
    monkeypatch.setattr(machine, "available_cores", lambda: 1)
    assert machine.default_threads() == 1
    monkeypatch.setattr(machine, "available_cores", lambda: 8)
    assert machine.default_threads() == 8
