"""Measure layers (and whole networks) on a device: onnxruntime or eager torch, CPU or CUDA.

``profile_family`` measures every layer a model family can take while it grows (the *grid*, see
:func:`family_grid`), one layer at a time, each as deployed: Conv2d with BatchNorm folded into its
bias, followed by the activation (Linear layers without one), exported with ``torch.onnx.export``
and timed in an onnxruntime ``InferenceSession`` (or run eagerly in torch). It also measures the
runtime's fixed per-inference overhead (a model that only copies its input) and writes everything
to a profile JSON (schema in :mod:`cost_models.profile_io`) atomically every few rows, so a killed
run resumes where it stopped when it is started again with the same ``out``.

``measure_model`` measures a whole network end to end the same way (the grow loop calls it after
every stage).
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import platform
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cost_models.meters import LatencyMeter, Measurement, NoGpuError, NvmlEnergyMeter, nvidia_gpu_available
from cost_models.profile_io import BACKENDS, METERS, SCHEMA, load_profile, save_profile
from hwsplit.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "CHANNEL_LADDER", "calibration_architectures", "DEFAULT_TIME_BUDGET_S", "METERS",
           "QUICK_TIME_BUDGET_S",
           "estimate_profile_seconds", "family_grid", "load_profile", "make_meter", "measure_layer",
           "measure_model", "profile_family"]

FAMILIES = ("mobilenet_v1",)
#: Channel counts measured: geometric, alternating ×1.5 and ×4/3 (≈ √2 per step).
CHANNEL_LADDER = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
DEFAULT_TIME_BUDGET_S = 1.0
QUICK_TIME_BUDGET_S = 0.05
DEFAULT_WARMUP = 10
#: Seconds per row on top of the time budget (export, session creation, warm-up) used for estimates.
PER_ROW_SETUP_S = 0.08
OPSET = 17
ProgressFn = Callable[..., Iterable[Any]]


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def _ladder(lo: int, hi: int, quick: bool) -> list[int]:
    """Channel counts covering [lo, hi]: the ladder from the rung at or below ``lo`` up to ``hi``
    (``hi`` itself always included); ``quick`` keeps only the two ends."""
    if lo >= hi:
        return [hi]
    if quick:
        return [lo, hi]
    start = max([c for c in CHANNEL_LADDER if c <= lo], default=lo)
    values = {c for c in CHANNEL_LADDER if start <= c <= hi} | {start, hi}
    return sorted(values)


def _family_positions(family: str, resolution: int, num_classes: int) -> list[dict[str, Any]]:
    """Every layer position of the family with the range of channels it can take while growing:
    from the CIFAR seed's widths to the standard MobileNetV1 widths at the same position."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    from hwsplit.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD

    seed, full = MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD
    if [s for _, s in seed["blocks"]] != [s for _, s in full["blocks"]]:  # pragma: no cover - data invariant
        raise ValueError("family: seed and standard MobileNetV1 strides differ")
    stem_stride = 2 if resolution >= 64 else 1
    positions: list[dict[str, Any]] = []
    h = resolution
    positions.append({"kind": "conv", "kernel": 3, "stride": stem_stride, "height": h, "cin": (3, 3),
                      "cout": (seed["stem"], full["stem"])})
    h = (h + 2 - 3) // stem_stride + 1
    prev = (seed["stem"], full["stem"])
    for (w_lo, stride), (w_hi, _) in zip(seed["blocks"], full["blocks"]):
        positions.append({"kind": "dwconv", "kernel": 3, "stride": stride, "height": h, "cin": prev, "cout": prev})
        h = (h + 2 - 3) // stride + 1
        positions.append({"kind": "pwconv", "kernel": 1, "stride": 1, "height": h, "cin": prev,
                          "cout": (w_lo, w_hi)})
        prev = (w_lo, w_hi)
    positions.append({"kind": "linear", "kernel": 1, "stride": 1, "height": 1, "cin": prev,
                      "cout": (num_classes, num_classes)})
    return positions


def family_grid(family: str = "mobilenet_v1", resolution: int = 32, *, quick: bool = False,
                num_classes: int = 10, batch: int = 1) -> list[LayerSpec]:
    """The LayerSpecs to measure for ``family`` at ``resolution``: for every (kind, kernel, stride,
    feature-map size) the family has, the union over its positions of the channel ladder between
    the seed's and the standard network's widths. Sorted by kind, geometry and channels."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    specs: set[LayerSpec] = set()
    for pos in _family_positions(family, resolution, num_classes):
        kind, k, s, h = pos["kind"], pos["kernel"], pos["stride"], pos["height"]
        if kind == "dwconv":
            lo, hi = min(pos["cin"]), max(pos["cin"])
            for c in _ladder(lo, hi, quick):
                specs.add(LayerSpec(kind=kind, in_channels=c, out_channels=c, kernel=k, stride=s, groups=c,
                                    height=h, width=h, batch=batch))
            continue
        for ci in _ladder(*pos["cin"], quick):
            for co in _ladder(*pos["cout"], quick):
                if kind == "linear":
                    specs.add(LayerSpec(kind=kind, in_channels=ci, out_channels=co, batch=batch, bias=True))
                else:
                    specs.add(LayerSpec(kind=kind, in_channels=ci, out_channels=co, kernel=k, stride=s,
                                        height=h, width=h, batch=batch))
    order = {"conv": 0, "dwconv": 1, "pwconv": 2, "linear": 3}
    return sorted(specs, key=lambda sp: (order[sp.kind], -sp.height, sp.stride, sp.in_channels, sp.out_channels))


def estimate_profile_seconds(n_rows: int, time_budget_s: float, meter: str = "latency") -> float:
    """Rough wall time of measuring ``n_rows`` rows (NVML windows are at least 3 × 1 s per row)."""
    per_row = max(time_budget_s, 3 * 1.0 + 2 * 0.5) if meter == "nvml" else time_budget_s
    return n_rows * (per_row + PER_ROW_SETUP_S)


# --------------------------------------------------------------------------------------------
# Devices, meters and runners
# --------------------------------------------------------------------------------------------

def _parse_device(device: str) -> tuple[str, int]:
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"device: expected 'cpu' or 'cuda:N', got {device!r}")


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field}: expected one of {tuple(choices)}, got {value!r}")


def make_meter(meter: str, device: str = "cpu", *, nvml: Any = None, **options: Any) -> Any:
    """A :class:`~cost_models.meters.LatencyMeter` or :class:`~cost_models.meters.NvmlEnergyMeter`.

    ``meter="nvml"`` without a usable NVIDIA GPU raises :class:`NoGpuError`; with a GPU but a CPU
    ``device`` it raises ``ValueError`` (NVML reads the GPU's energy, not the CPU's).
    """
    _check_choice("meter", meter, METERS)
    kind, index = _parse_device(device)
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


def export_onnx(module: nn.Module, example: Any) -> bytes:
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


class _Runner:
    """One inference of ``module`` on ``example``: ``run_once``, ``sync``, ``close``."""

    def __init__(self, module: nn.Module, example: Any, *, backend: str, device: str, threads: int) -> None:
        import torch

        self.kind, self.index = _parse_device(device)
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

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        model_bytes = export_onnx(module, example)
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


# --------------------------------------------------------------------------------------------
# Layers as deployed
# --------------------------------------------------------------------------------------------

def layer_module(spec: LayerSpec, activation: str = "silu") -> tuple[nn.Module, Any]:
    """A module running ``spec`` as deployed, and an example input.

    Convolutions: Conv2d with a bias (BatchNorm folded) followed by ``activation``; linear layers:
    Linear with a bias and no activation (the classifier). Weights are random (timing does not
    depend on their values); the seed is fixed for reproducibility.
    """
    import torch
    from torch import nn

    from hwsplit.models import ACTIVATIONS

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


def _measure(module: nn.Module, example: Any, *, backend: str, device: str, meter: Any, threads: int,
             time_budget_s: float, warmup: int) -> Measurement:
    runner = _Runner(module, example, backend=backend, device=device, threads=threads)
    try:
        return meter.measure(runner.run_once, time_budget_s=time_budget_s, warmup=warmup, sync=runner.sync)
    finally:
        runner.close()


def measure_layer(spec: LayerSpec, *, backend: str, device: str, meter: Any, threads: int, time_budget_s: float,
                  warmup: int = DEFAULT_WARMUP, activation: str = "silu") -> Measurement:
    """Measure one layer as deployed (see :func:`layer_module`)."""
    module, example = layer_module(spec, activation)
    return _measure(module, example, backend=backend, device=device, meter=meter, threads=threads,
                    time_budget_s=time_budget_s, warmup=warmup)


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("onnxruntime", "torch", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing runtime is recorded as None
            out[mod] = None
    return out


def device_info(device: str, backend: str, threads: int, meter: Any = None) -> dict[str, Any]:
    """What the profile says about the machine (no hostname)."""
    kind, index = _parse_device(device)
    info: dict[str, Any] = {"device": device if kind == "cpu" else f"cuda:{index}", "kind": kind,
                            "threads": threads, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
                            "driver": None, "runtime": _versions()}
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


#: Fields of an existing profile that must equal the new run's for a resume.
_COMPAT_FIELDS = ("backend", "meter", "batch", "family", "resolution", "activation")
_COMPAT_DEVICE_FIELDS = ("device", "name", "threads")


def _check_compatible(existing: dict[str, Any], header: dict[str, Any], path: Path) -> None:
    for field in _COMPAT_FIELDS:
        if existing.get(field) != header[field]:
            raise ValueError(f"{path}: existing profile has {field}={existing.get(field)!r}, this run "
                             f"{header[field]!r}; use another --out or the same settings to resume")
    for field in _COMPAT_DEVICE_FIELDS:
        old, new = existing["device"].get(field), header["device"][field]
        if old != new:
            raise ValueError(f"{path}: existing profile has device.{field}={old!r}, this run {new!r}; "
                             "use another --out or the same settings to resume")
    if existing["device"].get("runtime") != header["device"]["runtime"]:
        log.warning("%s: runtime versions differ from the existing profile's (%s vs %s); resuming anyway",
                    path, existing["device"].get("runtime"), header["device"]["runtime"])


def _row(spec: LayerSpec, m: Measurement) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": spec.to_dict(), "latency_ms": m.latency_ms.to_dict()}
    if m.energy_mj is not None:
        row["energy_mj"] = m.energy_mj.to_dict()
    if m.idle_power_w is not None:
        row["idle_power_w"] = m.idle_power_w
    return row


def _overhead_entry(m: Measurement, input_shape: tuple[int, ...]) -> dict[str, Any]:
    entry: dict[str, Any] = {"input_shape": list(input_shape), "latency_ms": m.latency_ms.to_dict()}
    if m.energy_mj is not None:
        entry["energy_mj"] = m.energy_mj.to_dict()
    return entry


def profile_family(*, family: str = "mobilenet_v1", resolution: int = 32, device: str = "cpu",
                   backend: str = "onnxruntime", meter: str = "latency", out: str | os.PathLike[str] | None = None,
                   quick: bool = False, threads: int | None = None, time_budget_s: float | None = None,
                   warmup: int = DEFAULT_WARMUP, activation: str = "silu", num_classes: int = 10,
                   layers: Sequence[LayerSpec] | None = None, max_rows: int | None = None, save_every: int = 10,
                   shuffle: bool = True, progress: ProgressFn | None = None, nvml: Any = None,
                   meter_options: dict[str, Any] | None = None, networks: int | None = None) -> dict[str, Any]:
    """Measure the family's layer grid on ``device`` and write the profile to ``out``.

    ``quick`` measures only the corners of every channel range (≈ 50 rows) with a short time budget.
    ``time_budget_s`` is the timed period per row (default 1 s, 0.05 s with ``quick``); ``threads``
    onnxruntime's intra-op threads (default: all cores available to this process). ``layers``
    replaces the grid; ``max_rows`` stops after that many new rows (the profile is still valid and
    a later run resumes). Rows already in ``out`` (same LayerSpec key) are not measured again; an
    ``out`` measured with another device, backend or meter is a ``ValueError``. ``progress`` is
    called as ``progress(iterable, desc=..., total=...)`` and returns an iterable (e.g. tqdm).
    ``meter="nvml"`` without an NVIDIA GPU raises :class:`~cost_models.meters.NoGpuError`.
    Rows are measured in a fixed shuffled order (``shuffle``) so slow drifts of the machine do not
    bias one geometry. Then ``networks`` random networks of the family (default 16, 4 with
    ``quick``; :func:`calibration_architectures`) are measured end to end into ``profile["networks"]``,
    which the cost models use to calibrate layer sums to whole networks (:mod:`cost_models.calibration`).
    """
    _check_choice("backend", backend, BACKENDS)
    _check_choice("meter", meter, METERS)
    _check_choice("family", family, FAMILIES)
    kind, _ = _parse_device(device)
    if threads is None:
        threads = _default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    if time_budget_s is None:
        time_budget_s = QUICK_TIME_BUDGET_S if quick else DEFAULT_TIME_BUDGET_S
    if not time_budget_s >= 0:
        raise ValueError(f"time_budget_s: expected >= 0, got {time_budget_s!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 0):
        raise ValueError(f"max_rows: expected a non-negative integer, got {max_rows!r}")
    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every: expected a positive integer, got {save_every!r}")
    from hwsplit.models import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if kind == "cuda" and backend == "torch":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} requested but torch sees no CUDA GPU")
    meter_obj = make_meter(meter, device, nvml=nvml, **(meter_options or {}))
    try:
        grid = list(layers) if layers is not None else family_grid(family, resolution, quick=quick,
                                                                     num_classes=num_classes)
        batches = {s.batch for s in grid} or {1}
        if len(batches) != 1:
            raise ValueError(f"layers: all layers must have the same batch, got {sorted(batches)}")
        batch = batches.pop()
        header: dict[str, Any] = {
            "schema": SCHEMA, "device": device_info(device, backend, threads, meter_obj), "backend": backend,
            "meter": meter, "method": getattr(meter_obj, "method", "wallclock"), "batch": batch,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "family": family,
            "resolution": resolution, "activation": activation, "quick": quick, "time_budget_s": time_budget_s,
            "layer_runs_as": f"Conv2d with folded BatchNorm (bias) + {activation}; Linear with bias, no activation",
        }
        path = Path(out) if out is not None else None
        rows: list[dict[str, Any]] = []
        profile = dict(header)
        if path is not None and path.exists():
            existing = load_profile(path)
            _check_compatible(existing, header, path)
            profile = dict(existing)
            profile["updated"] = header["created"]
            profile["quick"] = bool(existing.get("quick", False)) and quick
            profile["time_budget_s"] = min(float(existing.get("time_budget_s", time_budget_s)), time_budget_s)
            rows = list(existing["rows"])
            log.info("%s: resuming, %d rows already measured", path, len(rows))
        profile["rows"] = rows
        done = {LayerSpec.from_dict(r["layer"]).key() for r in rows}
        input_shape = (batch, 3, resolution, resolution)

        if "overhead" not in profile:
            module, example = overhead_module(input_shape)
            m = _measure(module, example, backend=backend, device=device, meter=meter_obj, threads=threads,
                         time_budget_s=max(time_budget_s, 0.0), warmup=warmup)
            profile["overhead"] = _overhead_entry(m, input_shape)
            log.info("runtime overhead per inference: %.4f ms", m.latency_ms.median)

        todo = [s for s in grid if s.key() not in done]
        if shuffle:
            random.Random(0).shuffle(todo)
        if max_rows is not None:
            todo = todo[:max_rows]
        estimate = estimate_profile_seconds(len(todo), time_budget_s, meter)
        log.info("profiling %d rows (%d in the grid, %d already measured) on %s with %s/%s: about %.0f s",
                 len(todo), len(grid), len(grid) - len([s for s in grid if s.key() not in done]), device, backend,
                 meter, estimate)

        spent_before = float(profile.get("profiling_seconds", 0.0))
        session_start = time.perf_counter()

        def save() -> None:
            # wall time of all sessions that built this profile, resumed ones included
            profile["profiling_seconds"] = round(spent_before + time.perf_counter() - session_start, 1)
            if path is not None:
                save_profile(profile, path)

        save()
        iterable: Iterable[LayerSpec] = todo
        if progress is not None:
            iterable = progress(todo, desc=f"profile {device} {backend}", total=len(todo))
        started = time.perf_counter()
        measured = 0
        try:
            for spec in iterable:
                m = measure_layer(spec, backend=backend, device=device, meter=meter_obj, threads=threads,
                                  time_budget_s=time_budget_s, warmup=warmup, activation=activation)
                rows.append(_row(spec, m))
                measured += 1
                if measured % save_every == 0:
                    save()
                    elapsed = time.perf_counter() - started
                    log.info("%d/%d rows, about %.0f s left", measured, len(todo),
                             elapsed / measured * (len(todo) - measured))
            n_networks = networks if networks is not None else (4 if quick else 16)
            if layers is None and n_networks > 0:
                _measure_networks(profile, family, resolution, n_networks, num_classes=num_classes,
                                  activation=activation, backend=backend, device=device, meter=meter_obj,
                                  threads=threads, time_budget_s=max(time_budget_s, 2 * time_budget_s if quick
                                                                     else 2.0), warmup=warmup, save=save,
                                  progress=progress)
        finally:
            save()
        return profile
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()


def calibration_architectures(family: str, resolution: int, n: int, *, num_classes: int = 10,
                              activation: str = "silu", seed: int = 20191007) -> list[dict[str, Any]]:
    """``n`` random architectures of ``family``: each layer's width drawn log-uniformly between the
    CIFAR seed's and the standard network's (one size level per network plus per-layer jitter, so
    the set spans small to large networks). Deterministic in ``seed``."""
    import math

    import numpy as np

    from hwsplit.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    lo = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    hi = [MOBILENET_V1_STANDARD["stem"]] + [w for w, _ in MOBILENET_V1_STANDARD["blocks"]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        level = (i + rng.uniform()) / n  # stratified over sizes
        widths = [int(round(math.exp(math.log(a) + float(np.clip(level + rng.normal(0, 0.15), 0, 1))
                                     * (math.log(b) - math.log(a))))) for a, b in zip(lo, hi)]
        out.append({"family": "mobilenet_v1", "stem_width": widths[0], "widths": widths[1:],
                    "strides": [st for _, st in MOBILENET_V1_CIFAR_SEED["blocks"]],
                    "stem_stride": 1 if resolution < 64 else 2, "num_classes": num_classes, "in_channels": 3,
                    "activation": activation, "dropout": 0.0})
    return out


def _measure_networks(profile: dict[str, Any], family: str, resolution: int, n: int, *, num_classes: int,
                      activation: str, backend: str, device: str, meter: Any, threads: int, time_budget_s: float,
                      warmup: int, save: Callable[[], None], progress: ProgressFn | None) -> None:
    import torch

    from hwsplit.models import model_from_architecture

    entries = profile.setdefault("networks", [])
    done = [e["architecture"] for e in entries]
    todo = [a for a in calibration_architectures(family, resolution, n, num_classes=num_classes,
                                                 activation=activation) if a not in done]
    shape = (int(profile["batch"]), 3, resolution, resolution)
    iterable: Iterable[dict[str, Any]] = todo
    if progress is not None and todo:
        iterable = progress(todo, desc="profile whole networks", total=len(todo))
    for arch in iterable:
        torch.manual_seed(0)
        model = model_from_architecture(arch).eval()
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        m = _measure(model, example, backend=backend, device=device, meter=meter, threads=threads,
                     time_budget_s=time_budget_s, warmup=warmup)
        entry: dict[str, Any] = {"architecture": arch, "input_shape": list(shape), "latency_ms": m.latency_ms.to_dict()}
        if m.energy_mj is not None:
            entry["energy_mj"] = m.energy_mj.to_dict()
        entries.append(entry)
        save()


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

    _check_choice("backend", backend, BACKENDS)
    if threads is None:
        threads = _default_threads()
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
        m = _measure(module, example, backend=backend, device=device, meter=meter_obj, threads=threads,
                     time_budget_s=time_budget_s, warmup=warmup)
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()
    return {"latency_ms": m.latency_ms.to_dict(),
            "energy_mj": m.energy_mj.to_dict() if m.energy_mj is not None else None}
