"""Meters: wall clock, NVML energy counter and power integration, against a fake shaped like pynvml."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cost_models.profiling.meters import (
    LatencyMeter,
    Measurement,
    Meter,
    NoGpuError,
    NvmlEnergyMeter,
    Stats,
    integrate_power_mj,
    nvidia_gpu_available,
)
from cost_models.profiling.runner import make_meter


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class FakeNvml:
    """A GPU drawing ``busy_w`` while running and ``idle_w`` otherwise, on a fake clock.

    Module-like: the same function and exception names as pynvml. ``counter=False`` makes the
    total-energy counter unsupported; ``resets`` lists counter reads (1-based) after which the
    counter restarts from zero; ``stale`` lists reads that return the previous value.
    """

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported

    def __init__(self, *, counter: bool = True, busy_w: float = 100.0, idle_w: float = 30.0,
                 run_s: float = 0.002, resets: tuple[int, ...] = (), stale: tuple[int, ...] = (),
                 init_fails: bool = False) -> None:
        self.clock = FakeClock()
        self.counter, self.busy_w, self.idle_w, self.run_s = counter, busy_w, idle_w, run_s
        self.resets, self.stale, self.init_fails = set(resets), set(stale), init_fails
        self.energy_mj = 5_000_000.0
        self.busy = False
        self.reads = 0
        self.last_read = self.energy_mj
        self.runs = 0
        self.inits = self.shutdowns = 0

    # workload and time
    def run_once(self) -> None:
        self.busy = True
        self.energy_mj += self.busy_w * self.run_s * 1e3
        self.clock.t += self.run_s
        self.runs += 1

    def sleep(self, seconds: float) -> None:
        self.busy = False
        self.energy_mj += self.idle_w * seconds * 1e3
        self.clock.t += seconds

    # pynvml's surface
    def nvmlInit(self) -> None:
        if self.init_fails:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        if index != 0:
            raise NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle: object) -> bytes:
        return b"Fake GPU 80GB"

    def nvmlSystemGetDriverVersion(self) -> str:
        return "555.42"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        if not self.counter:
            raise NVMLError_NotSupported("Not Supported")
        self.reads += 1
        if self.reads in self.stale:
            return int(self.last_read)
        value = self.energy_mj
        if self.reads in self.resets:
            self.energy_mj = value = 0.0
        self.last_read = value
        return round(value)

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        return int((self.busy_w if self.busy else self.idle_w) * 1e3)


def make_fake_meter(fake: FakeNvml, **kw: object) -> NvmlEnergyMeter:
    options = {"nvml": fake, "min_window_s": 0.1, "windows": 3, "idle_gap_s": 0.05, "idle_s": 0.2,
               "sample_interval_s": 0.01, "clock": fake.clock, "sleep": fake.sleep, "sampling_thread": False}
    options.update(kw)
    return NvmlEnergyMeter(0, **options)


# --------------------------------------------------------------------------------------------


def test_stats_match_numpy_percentiles() -> None:
    samples = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    s = Stats.from_samples(samples)
    assert (s.median, s.p25, s.p75, s.n) == pytest.approx(
        (np.median(samples), np.percentile(samples, 25), np.percentile(samples, 75), 6))
    assert Stats.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="samples"):
        Stats.from_samples([])


def test_latency_meter_on_fake_clock() -> None:
    clock = FakeClock()
    calls = []

    def run_once() -> None:
        calls.append(1)
        clock.t += 0.001

    meter = LatencyMeter(min_repeats=5, clock=clock)
    assert isinstance(meter, Meter) and not meter.supports_energy
    m = meter.measure(run_once, time_budget_s=0.05, warmup=3)
    assert m.method == "wallclock" and m.energy_mj is None
    assert m.latency_ms.median == pytest.approx(1.0)
    assert m.latency_ms.n == pytest.approx(50, abs=1)
    assert len(calls) == m.latency_ms.n + 3
    # a zero budget still takes min_repeats samples; sync is called inside each timed run
    syncs = []
    m = meter.measure(run_once, time_budget_s=0.0, warmup=0, sync=lambda: syncs.append(1))
    assert m.latency_ms.n == 5 and len(syncs) == 6


def test_latency_meter_real_clock_and_validation() -> None:
    m = LatencyMeter().measure(lambda: sum(range(100)), time_budget_s=0.01, warmup=1)
    assert m.latency_ms.n >= 5 and 0 < m.latency_ms.p25 <= m.latency_ms.median <= m.latency_ms.p75
    with pytest.raises(ValueError, match="min_repeats"):
        LatencyMeter(min_repeats=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        LatencyMeter().measure(lambda: None, time_budget_s=-1, warmup=0)


def test_nvml_counter_path() -> None:
    fake = FakeNvml()
    meter = make_fake_meter(fake)
    assert meter.supports_energy and meter.supports_energy_counter() and meter.method == "nvml_counter"
    syncs = []
    m = meter.measure(fake.run_once, warmup=5, sync=lambda: syncs.append(1))
    assert isinstance(m, Measurement) and m.method == "nvml_counter"
    # 100 W for 2 ms per run = 200 mJ per inference, exactly
    assert m.energy_mj.median == pytest.approx(200.0, rel=1e-3)
    assert m.energy_mj.n == 3
    assert m.latency_ms.median == pytest.approx(2.0)
    assert m.idle_power_w == pytest.approx(30.0, rel=1e-3)
    # every window lasted at least min_window_s of repeated runs after warm-up
    assert fake.runs >= 5 + 3 * 50
    assert syncs, "sync must be called before reading the counter"
    assert meter.device_info() == {"index": 0, "name": "Fake GPU 80GB", "driver": "555.42"}
    meter.close()
    assert fake.shutdowns == 1


def test_nvml_window_length_and_idle_gaps() -> None:
    fake = FakeNvml()
    sleeps = []
    meter = make_fake_meter(fake, sleep=lambda s: (sleeps.append(s), fake.sleep(s)), windows=4)
    meter.measure(fake.run_once, warmup=0)
    assert sleeps.count(0.05) == 3  # idle gaps between the 4 windows
    assert sleeps[0] == pytest.approx(0.2)  # the idle-power period comes first


def test_nvml_counter_reset_is_detected_and_window_remeasured(caplog: pytest.LogCaptureFixture) -> None:
    # reads: 1 capability probe, 2-3 idle, then (before, after) per window: read 5 is the first
    # window's "after" -> the counter restarts at 0 there, so that window goes negative.
    fake = FakeNvml(resets=(5,))
    meter = make_fake_meter(fake)
    with caplog.at_level(logging.WARNING, logger="cost_models.profiling.meters"):
        m = meter.measure(fake.run_once, warmup=0)
    assert "counter reset" in caplog.text
    assert m.energy_mj.n == 3  # three valid windows still
    assert m.energy_mj.median == pytest.approx(200.0, rel=1e-3)
    assert m.energy_mj.p25 > 0
    assert fake.reads == 1 + 2 + 2 * 4  # one extra window


def test_nvml_stale_counter_is_remeasured_then_gives_up() -> None:
    fake = FakeNvml(stale=(5,))
    m = make_fake_meter(fake).measure(fake.run_once, warmup=0)
    assert m.energy_mj.median == pytest.approx(200.0, rel=1e-3) and m.energy_mj.n == 3
    fake = FakeNvml(stale=tuple(range(4, 40)))
    with pytest.raises(RuntimeError, match="invalid windows"):
        make_fake_meter(fake, max_bad_windows=2).measure(fake.run_once, warmup=0)


def test_nvml_not_supported_falls_back_to_power_integration() -> None:
    fake = FakeNvml(counter=False)
    meter = make_fake_meter(fake, sample_interval_s=0.002)
    assert not meter.supports_energy_counter()
    assert meter.method == "nvml_power_integration"
    m = meter.measure(fake.run_once, warmup=2)
    assert m.method == "nvml_power_integration"
    # power sampled between runs; the first sample of a window after an idle gap reads idle power
    assert m.energy_mj.median == pytest.approx(200.0, rel=0.02)
    assert m.idle_power_w == pytest.approx(30.0)


def test_nvml_power_integration_with_sampling_thread() -> None:
    fake = FakeNvml(counter=False)
    meter = make_fake_meter(fake, sampling_thread=True, sample_interval_s=0.001)
    m = meter.measure(fake.run_once, warmup=0)
    assert m.energy_mj.median == pytest.approx(200.0, rel=0.02)


def test_integrate_power() -> None:
    assert integrate_power_mj([(0.0, 1000.0), (1.0, 1000.0)], 0.0, 1.0) == pytest.approx(1000.0)
    # a ramp from 0 to 2 W over 2 s is 2 J
    ramp = [(t, 1000.0 * t) for t in np.linspace(0, 2, 21)]
    assert integrate_power_mj(ramp, 0.0, 2.0) == pytest.approx(2000.0)
    # edges are held constant to the window's bounds
    assert integrate_power_mj([(0.5, 2000.0)], 0.0, 1.0) == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        integrate_power_mj([], 0.0, 1.0)


def test_no_gpu_is_a_clear_error() -> None:
    fake = FakeNvml(init_fails=True)
    assert nvidia_gpu_available(fake) is False
    assert nvidia_gpu_available(FakeNvml()) is True
    with pytest.raises(NoGpuError) as err:
        NvmlEnergyMeter(0, nvml=fake)
    message = str(err.value)
    assert "NVIDIA GPU" in message and "only latency" in message and "\n" not in message
    with pytest.raises(NoGpuError):
        NvmlEnergyMeter(3, nvml=FakeNvml())  # no such device index
    with pytest.raises(NoGpuError, match="only latency"):
        make_meter("nvml", "cuda:0", nvml=fake)


def test_make_meter() -> None:
    assert isinstance(make_meter("latency"), LatencyMeter)
    assert isinstance(make_meter("nvml", "cuda:0", nvml=FakeNvml()), NvmlEnergyMeter)
    with pytest.raises(ValueError, match="device"):
        make_meter("nvml", "cpu", nvml=FakeNvml())
    with pytest.raises(ValueError, match="meter"):
        make_meter("joules")
    with pytest.raises(ValueError, match="device"):
        make_meter("latency", "tpu")


def test_real_nvml_without_gpu_says_so() -> None:
    if nvidia_gpu_available():
        pytest.skip("this machine has an NVIDIA GPU")
    with pytest.raises(NoGpuError, match="only latency can be measured"):
        make_meter("nvml", "cuda:0")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU with CUDA")
def test_real_nvml_energy_of_a_matmul() -> None:
    import torch

    a = torch.randn(2048, 2048, device="cuda")
    meter = NvmlEnergyMeter(0, min_window_s=0.5, windows=2, idle_s=0.2, idle_gap_s=0.1)
    try:
        m = meter.measure(lambda: a @ a, warmup=5, sync=torch.cuda.synchronize)
    finally:
        meter.close()
    assert m.energy_mj.median > 0 and m.latency_ms.median > 0 and m.idle_power_w > 0
    assert m.method in ("nvml_counter", "nvml_power_integration")
