"""End-to-end measurement of a run's networks on the device a profile was made on (docs/design.md §6).

The cost models' measuring modules are imported lazily, only when a run measures, so that a run without a
profile never loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hwsplit.infra.errors import ConfigError
from hwsplit.run.config import GrowConfig

log = logging.getLogger(__name__)


def end_to_end_measurer(config: GrowConfig, profile: dict[str, Any] | None = None,
                        ) -> Callable[[nn.Module, tuple[int, ...]], dict[str, Any]] | None:
    """A function measuring a whole network as the profile's device measured its layers, or None.
    ``profile``: the run's profile as already loaded (read from ``config``'s path when not given).

    Uses the profile's backend, meter and threads on the device the profile was made on, when
    this machine has that kind of device; otherwise every stage records why it was not measured.
    A profile from another machine is allowed (that is what tables are for) and said so. On the
    profile's own device every record also carries ``profile_drift``: now ÷ then of two of the
    profile's context networks, timed once per run (a warning beyond ±10 %: the table's
    milliseconds are off by that much).
    """
    wanted = config.measure if config.measure is not None else config.profile is not None
    if not wanted:
        return None
    from cost_models.profile_io import load_profile
    from cost_models.profiling.machine import cpu_name
    from cost_models.profiling.measure import measure_model
    from cost_models.profiling.meters import nvidia_gpu_available

    if config.profile is None:
        backend, meter, kind, threads, name = "onnxruntime", "latency", "cpu", None, None
    else:
        profile = load_profile(config.profile) if profile is None else profile
        dev = profile.get("device", {})
        backend, meter = profile.get("backend", "onnxruntime"), profile.get("meter", "latency")
        kind, threads, name = dev.get("kind", "cpu"), dev.get("threads"), dev.get("name")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"profile: {config.profile}: device.kind {kind!r} is not one hwsplit can measure "
                          "(cpu or cuda)")
    here = cpu_name() if kind == "cpu" else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    same = name is None or name == here
    if not same:
        log.warning("the profile was measured on %r, this machine is %r: costs are predictions for the "
                    "profile's device, end-to-end measurements are of this one", name, here)
    reason = None
    if kind == "cuda" and not torch.cuda.is_available():
        reason = "the profile is of a CUDA device and this machine has none"
    elif meter == "nvml" and not nvidia_gpu_available():
        reason = "the profile measured NVML energy and this machine has no NVIDIA GPU"

    drift: dict[str, Any] = {}

    def profile_drift() -> dict[str, Any]:
        """Once per run, on the profile's own device: now ÷ then of some of the profile's context networks
        (:func:`cost_models.profiling.profiler.profile_drift`; logged when beyond its limit)."""
        if drift or not same or reason is not None or not (profile or {}).get("context"):
            return drift
        from cost_models.profiling.profiler import profile_drift as check

        try:
            result = check(profile, networks=2, time_budget_s=config.measure_time_s)
        except ValueError as err:
            log.info("no drift check: %s", err)
            drift["profile_drift"] = None
            return drift
        drift["profile_drift"] = round(result["ratio"], 4)
        return drift

    def measure(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
        info: dict[str, Any] = {"device": here, "backend": backend, "meter": meter, "same_device_as_profile": same}
        if reason is not None:
            return {**info, "skipped": reason}
        info.update(profile_drift())
        result = measure_model(model, input_shape, device="cpu" if kind == "cpu" else "cuda", backend=backend,
                               meter=meter, threads=threads, time_budget_s=config.measure_time_s)
        return {**info, **result}

    return measure


__all__ = ["end_to_end_measurer"]
