"""NVML idle power when the energy counter resets (or stalls) inside the idle window."""

from __future__ import annotations

import logging

import pytest
from test_meters import FakeNvml, make_fake_meter


@pytest.mark.parametrize("fault", [{"resets": (3,)}, {"stale": (3,)}], ids=["reset", "stale"])
def test_counter_fault_in_the_idle_window_falls_back_to_power(fault, caplog: pytest.LogCaptureFixture) -> None:
    # reads: 1 capability probe, 2-3 the idle window (read 3 restarts at 0, or repeats read 2)
    fake = FakeNvml(**fault)
    meter = make_fake_meter(fake)
    with caplog.at_level(logging.INFO, logger="cost_models.profiling.meters"):
        m = meter.measure(fake.run_once, warmup=0)
    assert "reading power instead" in caplog.text
    assert m.idle_power_w == pytest.approx(30.0)  # the power readings, not (0 - 5e6 mJ) / 0.2 s
    assert m.energy_mj.median == pytest.approx(200.0, rel=1e-3) and m.energy_mj.n == 3
    assert fake.reads == 1 + 2 + 2 * 3  # the windows themselves were all valid


def test_idle_power_from_the_counter_when_it_advances() -> None:
    fake = FakeNvml(idle_w=42.0)
    assert make_fake_meter(fake, idle_s=0.5).idle_power_w() == pytest.approx(42.0, rel=1e-3)
