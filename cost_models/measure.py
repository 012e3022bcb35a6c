"""End-to-end measurement of a whole network: the one protocol ``grow``, the benches and the
profile's validation share (docs/design.md §6)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cost_models.machine import default_threads
from cost_models.meters import NvmlEnergyMeter
from cost_models.profile_io import BACKENDS
from cost_models.runner import DEFAULT_WARMUP, check_choice, make_meter, measure_module

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["measure_model"]


def measure_model(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "cpu",
                  backend: str = "onnxruntime", meter: str = "latency", threads: int | None = None,
                  time_budget_s: float = 1.0, warmup: int = DEFAULT_WARMUP, nvml: Any = None,
                  meter_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """End-to-end latency (and energy with ``meter="nvml"``) of one inference of ``model``.

    The model is copied, put in eval mode and exported as is (onnxruntime folds BatchNorm into the
    convolutions). Returns ``{"latency_ms": stats, "energy_mj": stats | None}``.
    """
    import copy

    import torch

    check_choice("backend", backend, BACKENDS)
    if threads is None:
        threads = default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    if not isinstance(input_shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape: expected a tuple of positive integers, got {input_shape!r}")
    meter_obj = make_meter(meter, device, nvml=nvml, **(meter_options or {}))
    try:
        module = copy.deepcopy(model).cpu().eval()
        param = next(module.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
        m = measure_module(module, example, backend=backend, device=device, meter=meter_obj, threads=threads,
                     time_budget_s=time_budget_s, warmup=warmup)
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()
    return {"latency_ms": m.latency_ms.to_dict(),
            "energy_mj": m.energy_mj.to_dict() if m.energy_mj is not None else None}
