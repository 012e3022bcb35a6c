"""Run one module on a device and time it: ONNX export of a layer, the onnxruntime/torch runner,
meters (docs/design.md §6).

:func:`layer_module` builds a layer as deployed (Conv2d with BatchNorm folded into its bias plus
the activation; Linear with a bias), :func:`export_layer_onnx` exports a module with the
TorchScript exporter, :class:`Runner` runs one inference in an onnxruntime ``InferenceSession``
(or eagerly in torch), and :func:`measure_module` times a runner with a meter.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cost_models.profile_io import METERS
from cost_models.profiling.machine import parse_device
from cost_models.profiling.meters import LatencyMeter, Measurement, NoGpuError, NvmlEnergyMeter, nvidia_gpu_available
from hwsplit.network.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["DEFAULT_WARMUP", "OPSET", "Runner", "check_choice", "export_layer_onnx", "layer_module", "make_meter",
           "measure_layer", "measure_module", "overhead_module", "session_options"]

DEFAULT_WARMUP = 10
OPSET = 17


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    """``ValueError`` naming ``field`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{field}: expected one of {tuple(choices)}, got {value!r}")


def make_meter(meter: str, device: str = "cpu", *, nvml: Any = None, **options: Any) -> Any:
    """A :class:`~cost_models.profiling.meters.LatencyMeter` or :class:`~cost_models.profiling.meters.NvmlEnergyMeter`.

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


def _cuda_sync(kind: str) -> Callable[[], None] | None:
    if kind != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.synchronize


def session_options(threads: int) -> Any:
    """The onnxruntime session settings every timing uses (the runner, per-node traces): ``threads``
    intra-op threads, one inter-op thread, sequential execution, full graph optimisation (what a
    deployed session runs), warnings off."""
    import onnxruntime as ort  # lazy: only profiling needs it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def export_layer_onnx(module: nn.Module, example: Any) -> bytes:
    """ONNX bytes of ``module`` (eval mode) traced on ``example``, via the TorchScript exporter
    (``dynamo=False``: the torch.export-based exporter needs onnxscript, which hwsplit does not)."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs: dict[str, Any] = {"input_names": ["x"], "output_names": ["y"], "opset_version": OPSET,
                                  "do_constant_folding": True}
        try:
            torch.onnx.export(module, (example,), buf, dynamo=False, **kwargs)
        except TypeError:  # pragma: no cover - torch without the dynamo argument
            torch.onnx.export(module, (example,), buf, **kwargs)
    return buf.getvalue()


class Runner:
    """One inference of ``module`` on ``example``: ``run_once``, ``sync``, ``close``."""

    def __init__(self, module: nn.Module, example: Any, *, backend: str, device: str, threads: int) -> None:
        import torch

        self.kind, self.index = parse_device(device)
        self.sync = _cuda_sync(self.kind)
        self._restore: Callable[[], None] | None = None
        module = module.eval()
        if backend == "torch":
            if self.kind == "cuda":
                if not torch.cuda.is_available():
                    raise ValueError(f"device: {device} requested but torch sees no CUDA GPU")
                dev = torch.device("cuda", self.index)
                module, example = module.to(dev), example.to(dev)
            else:
                previous = torch.get_num_threads()
                torch.set_num_threads(threads)
                self._restore = lambda: torch.set_num_threads(previous)

            def run_once() -> None:
                with torch.inference_mode():
                    module(example)

            self.run_once = run_once
            return
        import onnxruntime as ort  # lazy: only profiling needs it

        options = session_options(threads)
        model_bytes = export_layer_onnx(module, example)
        x = example.detach().cpu().numpy()
        if self.kind == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise ValueError(f"device: {device} needs onnxruntime's CUDAExecutionProvider (install "
                                 f"onnxruntime-gpu); this onnxruntime has {', '.join(available)}")
            providers = [("CUDAExecutionProvider", {"device_id": self.index}), "CPUExecutionProvider"]
            self.session = ort.InferenceSession(model_bytes, options, providers=providers)
            if "CUDAExecutionProvider" not in self.session.get_providers():
                raise ValueError(f"device: onnxruntime could not start CUDAExecutionProvider on {device} "
                                 "(CUDA/cuDNN libraries missing or mismatched)")
            binding = self.session.io_binding()
            x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.index)
            binding.bind_ortvalue_input("x", x_dev)
            binding.bind_output("y", "cuda", self.index)
            self._keep = (x_dev, binding)
            session = self.session

            def run_once() -> None:
                session.run_with_iobinding(binding)

            if self.sync is None:
                self.sync = binding.synchronize_outputs
        else:
            self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            session, feeds = self.session, {"x": x}

            def run_once() -> None:
                session.run(None, feeds)

        self.run_once = run_once

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def layer_module(spec: LayerSpec, activation: str = "silu") -> tuple[nn.Module, Any]:
    """A module running ``spec`` as deployed, and an example input.

    Convolutions: Conv2d with a bias (BatchNorm folded) followed by ``activation``; linear layers:
    Linear with a bias and no activation (the classifier). Weights are random (timing does not
    depend on their values); the seed is fixed for reproducibility.
    """
    import torch
    from torch import nn

    from hwsplit.network.models import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gen = torch.Generator().manual_seed(0)
    if spec.kind == "linear":
        module: nn.Module = nn.Linear(spec.in_channels, spec.out_channels, bias=True)
        example = torch.randn(spec.batch, spec.in_channels, generator=gen)
    else:
        conv = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                         groups=spec.groups, bias=True)
        module = nn.Sequential(conv, ACTIVATIONS[activation]())
        example = torch.randn(spec.batch, spec.in_channels, spec.height, spec.width, generator=gen)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval(), example


def overhead_module(input_shape: tuple[int, ...]) -> tuple[nn.Module, Any]:
    """The near-empty model whose run time is the runtime's fixed per-inference overhead."""
    import torch
    from torch import nn

    return nn.Identity(), torch.zeros(input_shape)


def measure_module(module: nn.Module, example: Any, *, backend: str, device: str, meter: Any, threads: int,
                   time_budget_s: float, warmup: int) -> Measurement:
    """Time one inference of ``module`` on ``example`` with ``meter`` (a fresh :class:`Runner`)."""
    runner = Runner(module, example, backend=backend, device=device, threads=threads)
    try:
        return meter.measure(runner.run_once, time_budget_s=time_budget_s, warmup=warmup, sync=runner.sync)
    finally:
        runner.close()


def measure_layer(spec: LayerSpec, *, backend: str, device: str, meter: Any, threads: int, time_budget_s: float,
                  warmup: int = DEFAULT_WARMUP, activation: str = "silu") -> Measurement:
    """Measure one layer as deployed (see :func:`layer_module`)."""
    module, example = layer_module(spec, activation)
    return measure_module(module, example, backend=backend, device=device, meter=meter, threads=threads,
                    time_budget_s=time_budget_s, warmup=warmup)
