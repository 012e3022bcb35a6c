"""Which compute device a command may use, and how many CPU threads: the checks the run layer and the profiler share."""

from __future__ import annotations

import logging
import os
import re

from hwsplit.infra.errors import ConfigError, DeviceUnavailableError


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


#: Machines with at most this many cores train with one intra-op thread per process by default.
SMALL_MACHINE_CORES = 4

log = logging.getLogger(__name__)


def default_threads() -> int | None:
    """Intra-op threads for training and scoring when the user sets none (``None``: torch's own default).

    One thread on machines with at most :data:`SMALL_MACHINE_CORES` cores, unless ``OMP_NUM_THREADS`` says
    otherwise: there a second thread buys little, and with one other CPU-bound process on the machine torch's
    default of one thread per core collapses (docs/design.md §5, "Training on the CPU"; figures in
    BENCHMARKS.md). Larger machines keep torch's default.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = os.cpu_count() or 1
    return 1 if cores <= SMALL_MACHINE_CORES else None


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (``None``: :func:`default_threads`); the number in use.

    Raises ``ConfigError`` naming ``threads`` for a number below 1.
    """
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: expected a whole number >= 1 or None (automatic), got {threads!r}")
    chosen = threads if threads is not None else default_threads()
    if chosen is not None and chosen != torch.get_num_threads():
        torch.set_num_threads(chosen)
    log.info("intra-op threads: %d%s", torch.get_num_threads(), "" if threads is not None else " (automatic)")
    return torch.get_num_threads()


__all__ = ["SMALL_MACHINE_CORES", "apply_threads", "check_device", "default_threads"]
