"""Which compute device a command may use: the one check the run layer and the profiler share."""

from __future__ import annotations

import re

from hwsplit.errors import ConfigError, DeviceUnavailableError


def check_device(device: str, *, field: str = "device") -> None:
    """``ConfigError`` for a malformed device string, :class:`DeviceUnavailableError` when it is absent.

    Accepts ``cpu``, ``cuda`` and ``cuda:N``; CUDA must be available (and ``N`` exist).
    """
    if not isinstance(device, str) or re.fullmatch(r"cpu|cuda(:\d+)?", device) is None:
        raise ConfigError(f"{field}: expected cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{field} {device}: no CUDA GPU is available on this machine (use cpu)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"{field} {device}: this machine has {torch.cuda.device_count()} CUDA "
                                     "device(s)")


__all__ = ["check_device"]
