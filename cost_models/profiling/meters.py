"""What a measurement reads: wall-clock latency, NVML energy (counter, or integrated power samples).

A :class:`Meter` runs a workload (``run_once``: one inference) repeatedly and returns a
:class:`Measurement` (latency statistics, and energy statistics where the meter supports energy).
Meters are small and capability-checked (``supports_energy``), Zeus-style; the NVML meter takes the
``pynvml`` module as a constructor argument (imported lazily when not given) so tests pass a fake.

Energy follows docs/design.md §6: after warm-up, windows of at least ``min_window_s`` seconds of
repeated runs, separated by idle gaps; the energy of a window is read from NVML's total-energy
counter as after-minus-before (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and newer), or,
where the counter is unsupported, by integrating ``nvmlDeviceGetPowerUsage`` samples (mW) with the
trapezoid rule. Energy per inference = window energy / runs in the window. A counter that goes
backwards (a reset between two reads) or does not move invalidates its window, which is measured
again.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hwsplit.infra.errors import DeviceUnavailableError

log = logging.getLogger(__name__)

STATS_FIELDS = ("median", "p25", "p75", "n")
METHODS = ("wallclock", "nvml_counter", "nvml_power_integration")


class NoGpuError(DeviceUnavailableError):
    """Energy was asked for on a machine without a usable NVIDIA GPU / NVML."""

    def __init__(self, reason: str = "") -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(
            "energy needs an NVIDIA GPU with NVML (the nvidia-ml-py package and the NVIDIA driver) and none "
            f"is usable on this machine{detail}; only latency can be measured here: use --meter latency"
        )


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values."""
    if not sorted_values:
        raise ValueError("samples: no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac)


@dataclass(frozen=True)
class Stats:
    """Median and inter-quartile range of ``n`` samples (the unit is in the field holding it)."""

    median: float
    p25: float
    p75: float
    n: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        values = sorted(float(v) for v in samples)
        if not values:
            raise ValueError("samples: no values to summarise")
        return cls(median=_percentile(values, 50), p25=_percentile(values, 25), p75=_percentile(values, 75),
                   n=len(values))

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "p25": self.p25, "p75": self.p75, "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        missing = [f for f in STATS_FIELDS if f not in data]
        if missing:
            raise ValueError(f"stats: missing field {missing[0]!r}")
        return cls(median=float(data["median"]), p25=float(data["p25"]), p75=float(data["p75"]),
                   n=int(data["n"]))


@dataclass(frozen=True)
class Measurement:
    """What one meter read for one workload: per-inference latency and (optionally) energy."""

    latency_ms: Stats
    energy_mj: Stats | None = None
    idle_power_w: float | None = None
    method: str = "wallclock"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latency_ms": self.latency_ms.to_dict(), "method": self.method}
        if self.energy_mj is not None:
            out["energy_mj"] = self.energy_mj.to_dict()
        if self.idle_power_w is not None:
            out["idle_power_w"] = self.idle_power_w
        return out


@runtime_checkable
class Meter(Protocol):
    """Measures one workload. ``supports_energy`` says whether ``Measurement.energy_mj`` is filled."""

    name: str
    supports_energy: bool

    def measure(self, run_once: Callable[[], None], *, time_budget_s: float, warmup: int,
                sync: Callable[[], None] | None = None) -> Measurement: ...


def _noop() -> None:
    return None


class LatencyMeter:
    """Wall-clock latency (``time.perf_counter``): warm-up, then timed runs until the time budget is
    spent and at least ``min_repeats`` runs were timed (at most ``max_repeats``); median and IQR.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called after every run, inside the timed interval.
    """

    name = "latency"
    supports_energy = False

    def __init__(self, *, min_repeats: int = 5, max_repeats: int = 1_000_000,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not isinstance(min_repeats, int) or min_repeats < 1:
            raise ValueError(f"min_repeats: expected a positive integer, got {min_repeats!r}")
        if not isinstance(max_repeats, int) or max_repeats < min_repeats:
            raise ValueError(f"max_repeats: expected an integer >= min_repeats, got {max_repeats!r}")
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.clock = clock

    def measure(self, run_once: Callable[[], None], *, time_budget_s: float = 0.2, warmup: int = 5,
                sync: Callable[[], None] | None = None) -> Measurement:
        if time_budget_s < 0:
            raise ValueError(f"time_budget_s: expected >= 0, got {time_budget_s!r}")
        if warmup < 0:
            raise ValueError(f"warmup: expected >= 0, got {warmup!r}")
        sync = sync or _noop
        clock = self.clock
        for _ in range(warmup):
            run_once()
        sync()
        samples_ms: list[float] = []
        start = clock()
        while len(samples_ms) < self.max_repeats:
            t0 = clock()
            run_once()
            sync()
            t1 = clock()
            samples_ms.append((t1 - t0) * 1e3)
            if len(samples_ms) >= self.min_repeats and t1 - start >= time_budget_s:
                break
        return Measurement(latency_ms=Stats.from_samples(samples_ms), method="wallclock")


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError as err:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NoGpuError(f"pynvml cannot be imported: {err}") from None
    return pynvml


def nvidia_gpu_available(nvml: Any = None) -> bool:
    """True when NVML initialises and reports at least one GPU. Never raises."""
    try:
        nvml = nvml if nvml is not None else _import_pynvml()
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return False
    try:
        count_fn = getattr(nvml, "nvmlDeviceGetCount", None)
        if count_fn is not None:
            return int(count_fn()) > 0
        nvml.nvmlDeviceGetHandleByIndex(0)
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as err:  # noqa: BLE001
            log.debug("nvmlShutdown failed: %s", err)


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _PowerSampler:
    """Background thread appending ``(time_s, power_mw)`` samples every ``interval_s``."""

    def __init__(self, read_mw: Callable[[], float], clock: Callable[[], float], interval_s: float) -> None:
        self.read_mw = read_mw
        self.clock = clock
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hwsplit-power-sampler", daemon=True)

    def sample(self) -> None:
        value = float(self.read_mw())
        with self._lock:
            self.samples.append((self.clock(), value))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - a failing read ends sampling, main thread decides
                log.warning("power sampling stopped: %s", err)
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def window(self, t0_s: float, t1_s: float) -> list[tuple[float, float]]:
        """The samples ``(time_s, power_mw)`` taken in ``[t0_s, t1_s]`` (seconds of the meter's clock)."""
        with self._lock:
            return sorted(s for s in self.samples if t0_s <= s[0] <= t1_s)


def integrate_power_mj(samples: Sequence[tuple[float, float]], t0_s: float, t1_s: float) -> float:
    """Energy (mJ) of power samples ``(time_s, power_mw)`` over ``[t0_s, t1_s]`` (seconds): trapezoid rule between
    samples, the first/last value held constant to the window's edges."""
    if not samples:
        raise ValueError("samples: no power samples in the window")
    pts = sorted(samples)
    energy = pts[0][1] * max(0.0, pts[0][0] - t0_s) + pts[-1][1] * max(0.0, t1_s - pts[-1][0])
    for (ta, pa), (tb, pb) in itertools.pairwise(pts):
        energy += 0.5 * (pa + pb) * (tb - ta)
    return energy  # mW · s = mJ


class NvmlEnergyMeter:
    """Energy and latency of one workload on NVIDIA GPU ``device_index``, read through NVML.

    ``nvml`` is the ``pynvml`` module (imported lazily when ``None``). ``min_window_s`` is the
    minimum length of one measurement window, ``windows`` how many valid windows to take,
    ``idle_gap_s`` the pause between windows, ``idle_s`` the idle period whose power is recorded
    before measuring (again when the last reading is older than ``idle_every_s``). ``clock``/``sleep``
    are injectable so tests run on a fake clock.
    Raises :class:`NoGpuError` when NVML cannot be initialised or has no such device.
    """

    name = "nvml"
    supports_energy = True

    def __init__(self, device_index: int = 0, *, nvml: Any = None, min_window_s: float = 1.0, windows: int = 3,
                 idle_gap_s: float = 0.5, idle_s: float = 1.0, sample_interval_s: float = 0.01,
                 max_bad_windows: int = 3, idle_every_s: float = 60.0, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, sampling_thread: bool = True) -> None:
        if not isinstance(device_index, int) or device_index < 0:
            raise ValueError(f"device_index: expected a non-negative integer, got {device_index!r}")
        if not min_window_s > 0:
            raise ValueError(f"min_window_s: expected > 0, got {min_window_s!r}")
        if not isinstance(windows, int) or windows < 1:
            raise ValueError(f"windows: expected a positive integer, got {windows!r}")
        if idle_gap_s < 0 or idle_s < 0:
            raise ValueError("idle_gap_s: expected >= 0" if idle_gap_s < 0 else "idle_s: expected >= 0")
        if not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s: expected > 0, got {sample_interval_s!r}")
        self.device_index = device_index
        self.min_window_s = float(min_window_s)
        self.windows = windows
        self.idle_gap_s = float(idle_gap_s)
        self.idle_s = float(idle_s)
        self.sample_interval_s = float(sample_interval_s)
        self.max_bad_windows = max_bad_windows
        self.idle_every_s = float(idle_every_s)
        self.clock = clock
        self.sleep = sleep
        self.sampling_thread = sampling_thread
        self.nvml = nvml if nvml is not None else _import_pynvml()
        try:
            self.nvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise NoGpuError(f"nvmlInit failed: {err}") from None
        try:
            self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as err:  # noqa: BLE001
            self.close()
            raise NoGpuError(f"no NVIDIA GPU with index {device_index}: {err}") from None
        self._counter: bool | None = None
        self._idle: tuple[float, float] | None = None

    # -- capabilities -----------------------------------------------------------------------
    def supports_energy_counter(self) -> bool:
        """Whether the GPU has NVML's total-energy counter (Volta and newer)."""
        if self._counter is None:
            try:
                self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
                self._counter = True
            except self.nvml.NVMLError_NotSupported:
                log.info("NVML total-energy counter not supported on GPU %d: integrating power samples",
                         self.device_index)
                self._counter = False
        return self._counter

    @property
    def method(self) -> str:
        return "nvml_counter" if self.supports_energy_counter() else "nvml_power_integration"

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"index": self.device_index}
        try:
            info["name"] = _as_str(self.nvml.nvmlDeviceGetName(self.handle))
        except Exception:  # noqa: BLE001
            info["name"] = None
        try:
            info["driver"] = _as_str(self.nvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001
            info["driver"] = None
        return info

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as err:  # noqa: BLE001
            log.debug("nvmlShutdown failed: %s", err)

    # -- reads ----------------------------------------------------------------------------------
    def _energy_mj(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def _power_mw(self) -> float:
        return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle))

    def idle_power_w(self, sampler: _PowerSampler | None = None) -> float:
        """Average power (W) over ``idle_s`` of doing nothing."""
        if self.supports_energy_counter():
            t0, e0 = self.clock(), self._energy_mj()
            self.sleep(self.idle_s)
            t1, e1 = self.clock(), self._energy_mj()
            if e1 > e0 and t1 > t0:
                return (e1 - e0) / (t1 - t0) / 1e3
            log.info("energy counter did not advance over the idle period; reading power instead")
        readings = [self._power_mw()]
        steps = max(1, int(self.idle_s / self.sample_interval_s)) if self.idle_s > 0 else 0
        for _ in range(min(steps, 100)):
            self.sleep(self.idle_s / min(steps, 100))
            readings.append(self._power_mw())
        return sum(readings) / len(readings) / 1e3

    # -- measurement ----------------------------------------------------------------------------
    def measure(self, run_once: Callable[[], None], *, time_budget_s: float = 0.0, warmup: int = 10,
                sync: Callable[[], None] | None = None) -> Measurement:
        """Warm-up, idle power, then ``windows`` valid windows of at least
        ``max(min_window_s, time_budget_s / windows)`` seconds each."""
        sync = sync or _noop
        counter = self.supports_energy_counter()
        window_s = max(self.min_window_s, time_budget_s / self.windows)
        sync()
        now = self.clock()
        if self._idle is None or now - self._idle[0] >= self.idle_every_s:
            self._idle = (now, self.idle_power_w())
        idle_w = self._idle[1]
        for _ in range(warmup):
            run_once()
        sync()
        sampler = None
        if not counter:
            sampler = _PowerSampler(self._power_mw, self.clock, self.sample_interval_s)
            if self.sampling_thread:
                sampler.start()
        energies_mj: list[float] = []
        latencies_ms: list[float] = []
        bad = 0
        try:
            while len(energies_mj) < self.windows:
                if energies_mj or bad:
                    self.sleep(self.idle_gap_s)
                sync()
                if counter:
                    e0 = self._energy_mj()
                t_start = self.clock()
                if not counter:
                    sampler.sample()
                last_sample = t_start
                runs = 0
                window_lat: list[float] = []
                while True:
                    t0 = self.clock()
                    run_once()
                    sync()
                    t1 = self.clock()
                    runs += 1
                    window_lat.append((t1 - t0) * 1e3)
                    if t1 - t_start >= window_s:
                        break
                    if sampler is not None and t1 - last_sample >= self.sample_interval_s:
                        sampler.sample()  # between runs too: dense samples even without the thread
                        last_sample = t1
                if counter:
                    t_end = self.clock()
                    e1 = self._energy_mj()
                    window_mj = e1 - e0
                else:
                    sampler.sample()
                    t_end = self.clock()
                    window_mj = integrate_power_mj(sampler.window(t_start, t_end), t_start, t_end)
                if not window_mj > 0:
                    bad += 1
                    what = "went backwards (counter reset)" if window_mj < 0 else "did not advance"
                    log.warning("NVML energy %s during a %.2f s window; measuring the window again", what,
                                t_end - t_start)
                    if bad > self.max_bad_windows:
                        raise RuntimeError(
                            f"NVML energy: {bad} invalid windows (counter reset or stale) on GPU "
                            f"{self.device_index}; the GPU may be shared or its counter unreliable")
                    continue
                energies_mj.append(window_mj / runs)
                latencies_ms.extend(window_lat)
        finally:
            if sampler is not None and self.sampling_thread:
                sampler.stop()
        return Measurement(latency_ms=Stats.from_samples(latencies_ms), energy_mj=Stats.from_samples(energies_mj),
                           idle_power_w=idle_w, method="nvml_counter" if counter else "nvml_power_integration")
