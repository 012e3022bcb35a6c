"""The machine a measurement runs on: device strings, thread counts, the CPU's name, what a profile
records about the device, and the meter for a device (docs/design.md §6)."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Sequence
from typing import Any

from cost_models.meters import LatencyMeter, NoGpuError, NvmlEnergyMeter, nvidia_gpu_available
from cost_models.profile_io import METERS

log = logging.getLogger(__name__)

__all__ = ["available_cores", "check_choice", "cpu_name", "default_threads", "device_info", "make_meter",
           "parse_device",
           "runtime_versions"]


def parse_device(device: str) -> tuple[str, int]:
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"device: expected 'cpu' or 'cuda:N', got {device!r}")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Intra-op threads a measurement uses by default: 1 on a machine with ≤ 2 cores, else every core.

    Why 1 on a small VM: with 2 intra-op threads on a 2-vCPU VM one thread shares its core with the
    OS and every other process, and the same network's median swung between 0.14 and 0.36 ms from
    one round to the next; with 1 thread 12 of 12 networks repeated within ±5 % (issue 11)."""
    cores = available_cores()
    return 1 if cores <= 2 else cores


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field}: expected one of {tuple(choices)}, got {value!r}")


def make_meter(meter: str, device: str = "cpu", *, nvml: Any = None, **options: Any) -> Any:
    """A :class:`~cost_models.meters.LatencyMeter` or :class:`~cost_models.meters.NvmlEnergyMeter`.

    ``meter="nvml"`` without a usable NVIDIA GPU raises :class:`NoGpuError`; with a GPU but a CPU
    ``device`` it raises ``ValueError`` (NVML reads the GPU's energy, not the CPU's).
    """
    check_choice("meter", meter, METERS)
    kind, index = parse_device(device)
    if meter == "latency":
        return LatencyMeter(**options)
    if not nvidia_gpu_available(nvml):
        raise NoGpuError("NVML did not initialise or reports no GPU")
    if kind != "cuda":
        raise ValueError(f"device: --meter nvml measures an NVIDIA GPU's energy; use device cuda:N, not {device!r}")
    return NvmlEnergyMeter(index, nvml=nvml, **options)



def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def runtime_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("onnxruntime", "torch", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing runtime is recorded as None
            out[mod] = None
    return out


def device_info(device: str, backend: str, threads: int, meter: Any = None) -> dict[str, Any]:
    """What the profile says about the machine (no hostname)."""
    kind, index = parse_device(device)
    info: dict[str, Any] = {"device": device if kind == "cpu" else f"cuda:{index}", "kind": kind,
                            "threads": threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
                            "driver": None, "runtime": runtime_versions()}
    info["name"] = info["cpu"]
    if kind == "cuda":
        gpu = meter.device_info() if isinstance(meter, NvmlEnergyMeter) else {}
        name, driver = gpu.get("name"), gpu.get("driver")
        try:
            import torch

            if torch.cuda.is_available():
                name = name or torch.cuda.get_device_name(index)
                info["runtime"]["cuda"] = torch.version.cuda
        except Exception as err:  # noqa: BLE001
            log.debug("torch cannot describe %s: %s", device, err)
        info["name"] = name or f"cuda:{index}"
        info["driver"] = driver
    if backend == "onnxruntime":
        try:
            import onnxruntime as ort

            info["runtime"]["onnxruntime_providers"] = ort.get_available_providers()
        except Exception as err:  # noqa: BLE001
            log.debug("onnxruntime providers unknown: %s", err)
    return info
