"""What machine a profile is measured on: device names, CPU model, thread default, runtime versions."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

from cost_models.profiling.meters import NvmlEnergyMeter

log = logging.getLogger(__name__)

__all__ = ["cpu_name", "default_threads", "device_info", "parse_device", "runtime_versions"]


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` → (kind, index); anything else is a ``ValueError``."""
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"device: expected 'cpu' or 'cuda:N', got {device!r}")


def default_threads() -> int:
    """Cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), or what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def runtime_versions() -> dict[str, str | None]:
    """Versions of python and the runtimes a measurement depends on (None when not installed)."""
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

