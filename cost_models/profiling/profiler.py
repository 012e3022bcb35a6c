"""Profile a device: orchestration of the measurements into a profile file (docs/design.md §6).

``profile_family`` measures every layer a model family can take while it grows (the *grid*,
:func:`cost_models.profiling.grid.family_grid`), one layer at a time, each as deployed
(:mod:`cost_models.profiling.runner`). It also measures the runtime's fixed per-inference overhead (a model
that only copies its input) and whole random networks of the family, and writes everything to a
profile JSON (schema in :mod:`cost_models.profile_io`) atomically every few rows, so a killed run
resumes where it stopped when it is started again with the same ``out``.

Whole networks are measured with :func:`cost_models.profiling.measure.measure_model` (the grow loop calls it
after every stage). The names of those modules are re-exported here for callers of the profiler.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cost_models.profile_io import (
    BACKENDS,
    METERS,
    SCHEMA,
    channel_block,
    depthwise_multiple,
    load_profile,
    save_profile,
)
from cost_models.profiling.channel_block import detect_channel_block
from cost_models.profiling.grid import (
    CHANNEL_LADDER,
    FAMILIES,
    aligned_architecture,
    calibration_architectures,
    family_grid,
    growth_architectures,
)
from cost_models.profiling.machine import cpu_name, default_threads, device_info, parse_device
from cost_models.profiling.measure import measure_model, measure_rounds, repeatability
from cost_models.profiling.meters import Measurement, NvmlEnergyMeter
from cost_models.profiling.node_trace import attribute_nodes, node_times
from cost_models.profiling.runner import (
    DEFAULT_WARMUP,
    Runner,
    check_choice,
    make_meter,
    measure_layer,
    measure_module,
    overhead_module,
)
from hwsplit.network.specs import LayerSpec

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "CHANNEL_LADDER", "DEFAULT_TIME_BUDGET_S", "FAMILIES", "METERS", "QUICK_TIME_BUDGET_S",
           "calibration_architectures", "context_architectures", "default_profile_threads",
           "estimate_profile_seconds", "family_grid", "load_profile", "make_meter",
           "measure_layer", "measure_model", "profile_family"]

DEFAULT_TIME_BUDGET_S = 1.0
QUICK_TIME_BUDGET_S = 0.05
#: Seconds per row on top of the time budget (export, session creation, warm-up) used for estimates.
PER_ROW_SETUP_S = 0.08
#: Networks the repeatability check measures twice (the first of the in-context networks).
REPEATABILITY_NETWORKS = 8
ProgressFn = Callable[..., Iterable[Any]]


def estimate_profile_seconds(n_rows: int, time_budget_s: float, meter: str = "latency") -> float:
    """Rough wall time of measuring ``n_rows`` rows (NVML windows are at least 3 × 1 s per row)."""
    per_row = max(time_budget_s, 3 * 1.0 + 2 * 0.5) if meter == "nvml" else time_budget_s
    return n_rows * (per_row + PER_ROW_SETUP_S)



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
                   meter_options: dict[str, Any] | None = None, networks: int | None = None,
                   context_networks: int | None = None) -> dict[str, Any]:
    """Measure the family's layer grid on ``device`` and write the profile to ``out``.

    ``quick`` measures only the corners of every channel range (≈ 50 rows) with a short time budget.
    ``time_budget_s`` is the timed period per row (default 1 s, 0.05 s with ``quick``); ``threads``
    onnxruntime's intra-op threads (default :func:`default_profile_threads`: 1 on a machine with at most 2
    cores, else the cores this process may use). ``layers``
    replaces the grid; ``max_rows`` stops after that many new rows (the profile is still valid and
    a later run resumes). Rows already in ``out`` (same LayerSpec key) are not measured again; an
    ``out`` measured with another device, backend or meter is a ``ValueError``. ``progress`` is
    called as ``progress(iterable, desc=..., total=...)`` and returns an iterable (e.g. tqdm).
    ``meter="nvml"`` without an NVIDIA GPU raises :class:`~cost_models.profiling.meters.NoGpuError`.
    Rows are measured in a fixed shuffled order (``shuffle``) so slow drifts of the machine do not
    bias one geometry. Then ``networks`` random networks of the family (default 16, 4 with
    ``quick``; :func:`calibration_architectures`) are measured end to end into ``profile["networks"]``,
    which the cost models use to calibrate layer sums to whole networks (:mod:`cost_models.calibration`).

    With onnxruntime on the CPU (latency), three more sections (docs/design.md §6): ``channel_block``
    (and ``blocks``, the evidence; :func:`cost_models.profiling.channel_block.detect_channel_block`),
    ``repeatability`` (:func:`cost_models.profiling.measure.repeatability`: a noise floor worse than ±5 % is
    flagged and warned about) and ``context``: ``context_networks`` random networks of the family
    (default 96, 6 with ``quick``; half of them with widths divisible by the block) measured end to
    end and node by node (:mod:`cost_models.context`), from which the table is fitted in context.
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("meter", meter, METERS)
    check_choice("family", family, FAMILIES)
    kind, _ = parse_device(device)
    if threads is None:
        threads = default_profile_threads()
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
    from hwsplit.network.models import ACTIVATIONS

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
            m = measure_module(module, example, backend=backend, device=device, meter=meter_obj, threads=threads,
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
            n_context = context_networks if context_networks is not None else (6 if quick else 96)
            if layers is None and backend == "onnxruntime" and kind == "cpu" and meter == "latency" and n_context > 0:
                _measure_in_context(profile, family, resolution, n_context, num_classes=num_classes,
                                    activation=activation, meter=meter_obj, threads=threads,
                                    time_budget_s=0.5 if quick else 1.0, save=save, progress=progress)
        finally:
            save()
        return profile
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()



def _pending(archs: Sequence[dict[str, Any]], entries: Sequence[dict[str, Any]], *, desc: str,
             progress: ProgressFn | None) -> Iterable[dict[str, Any]]:
    """The architectures of ``archs`` not yet in ``entries`` (what a resumed profile still measures),
    under ``progress`` when given."""
    done = [e["architecture"] for e in entries]
    todo = [a for a in archs if a not in done]
    return progress(todo, desc=desc, total=len(todo)) if progress is not None and todo else todo


def _seeded_model(arch: dict[str, Any]) -> Any:
    """The network of ``arch`` in eval mode, initialised from seed 0 (its timing does not depend on the
    weights; the seed keeps a resumed profile's exports identical)."""
    import torch

    from hwsplit.network.models import model_from_architecture

    torch.manual_seed(0)
    return model_from_architecture(arch).eval()


def _measure_networks(profile: dict[str, Any], family: str, resolution: int, n: int, *, num_classes: int,
                      activation: str, backend: str, device: str, meter: Any, threads: int, time_budget_s: float,
                      warmup: int, save: Callable[[], None], progress: ProgressFn | None) -> None:
    import torch

    entries = profile.setdefault("networks", [])
    archs = calibration_architectures(family, resolution, n, num_classes=num_classes, activation=activation)
    shape = (int(profile["batch"]), 3, resolution, resolution)
    for arch in _pending(archs, entries, desc="profile whole networks", progress=progress):
        model = _seeded_model(arch)
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        runner = Runner(model, example, backend=backend, device=device, threads=threads)
        try:
            m = measure_rounds(runner.run_once, meter=meter, time_budget_s=time_budget_s, warmup=warmup,
                               sync=runner.sync)
        finally:
            runner.close()
        entry: dict[str, Any] = {"architecture": arch, "input_shape": list(shape), "latency_ms": m["latency_ms"]}
        if m["energy_mj"] is not None:
            entry["energy_mj"] = m["energy_mj"]
        entries.append(entry)
        save()


def default_profile_threads() -> int:
    """Intra-op threads a profile uses by default: 1 on a machine with at most 2 cores (there a
    second thread shares its core with everything else and does not repeat: README "profile"), else the
    cores this process may use."""
    cores = default_threads()
    return 1 if cores <= 2 else cores


def context_architectures(family: str, resolution: int, n: int, block: int, *, num_classes: int = 10,
                          activation: str = "silu") -> list[dict[str, Any]]:
    """The fitting networks of the in-context table (seeds of their own, so none is a calibration or
    bench network), every other one with widths divisible by ``block``: two thirds spread over the
    family from the CIFAR seed to the standard widths (:func:`calibration_architectures`), one third
    shaped as growth shapes them (:func:`growth_architectures`: early layers near the seed, late ones
    grown up to 12×)."""
    uniform = n - n // 3
    archs = calibration_architectures(family, resolution, uniform, num_classes=num_classes, activation=activation,
                                      seed=20261202)
    grown = growth_architectures(family, resolution, n // 3, num_classes=num_classes, activation=activation)
    return ([aligned_architecture(a, block) if i % 2 == 0 else a for i, a in enumerate(archs)]
            + [aligned_architecture(a, block) if i % 2 == 0 else a for i, a in enumerate(grown)])


def _measure_in_context(profile: dict[str, Any], family: str, resolution: int, n: int, *, num_classes: int,
                        activation: str, meter: Any, threads: int, time_budget_s: float, save: Callable[[], None],
                        progress: ProgressFn | None) -> None:
    import torch

    from hwsplit.network.graph import layer_specs

    if "channel_block" not in profile:
        blocks = detect_channel_block(threads=threads)
        profile["channel_block"] = blocks["channel_block"]
        profile["blocks"] = blocks
        log.info("onnxruntime's channel block here: %d (depthwise blocked at multiples of %d)",
                 blocks["channel_block"], blocks["depthwise_multiple"])
        save()
    block = int(profile["channel_block"])
    archs = context_architectures(family, resolution, n, block, num_classes=num_classes, activation=activation)
    shape = (int(profile["batch"]), 3, resolution, resolution)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if "repeatability" not in profile:
        runners = [Runner(_seeded_model(arch), example, backend="onnxruntime", device="cpu", threads=threads)
                   for arch in archs[:REPEATABILITY_NETWORKS]]
        try:
            # the check judges what one measurement delivers (median of rounds), timed as the networks below are
            profile["repeatability"] = repeatability([r.run_once for r in runners], meter=meter,
                                                     time_budget_s=time_budget_s)
        finally:
            for r in runners:
                r.close()
        save()
    context = profile.setdefault("context", {"networks": [], "node_runs": 100})
    for arch in _pending(archs, context["networks"], desc="profile networks node by node", progress=progress):
        model = _seeded_model(arch)
        specs = layer_specs(model, shape)
        runner = Runner(model, example, backend="onnxruntime", device="cpu", threads=threads)
        try:
            e2e = measure_rounds(runner.run_once, meter=meter, time_budget_s=time_budget_s, warmup=DEFAULT_WARMUP)
        finally:
            runner.close()
        nodes = node_times(model, example, threads=threads, runs=int(context["node_runs"]))
        per_layer = attribute_nodes(nodes, [s.name for s in specs], [s.name for s in specs if s.kind == "linear"])
        context["networks"].append({
            "architecture": arch, "input_shape": list(shape), "latency_ms": e2e["latency_ms"],
            "node_sum_ms": sum(x["ms"] for x in nodes), "nodes": len(nodes),
            "layers": [{"layer": s.to_dict(), "latency_ms": per_layer[s.name]["ms"],
                        "nodes": per_layer[s.name]["nodes"]} for s in specs]})
        save()



#: A machine whose whole networks run this much faster or slower than when its profile was made is flagged (%).
DRIFT_LIMIT_PCT = 10.0


def _aligned(arch: dict[str, Any], multiple: int) -> bool:
    """Whether every width of ``arch`` is a multiple of ``multiple`` (the blocked kernels take it)."""
    return multiple > 1 and all(int(w) % multiple == 0 for w in [arch.get("stem_width", multiple), *arch["widths"]])


def _spread(nets: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """``k`` of ``nets`` spread over their recorded end-to-end times, fastest first, no repeats."""
    ranked = sorted(nets, key=lambda n: float(n["latency_ms"]["median"]))
    return ranked[::max(1, len(ranked) // k)][:k] if k > 0 else []


def profile_drift(profile: dict[str, Any], *, networks: int = 4, time_budget_s: float = 1.0,
                  threads: int | None = None, measure: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Whether this machine still runs as it did when ``profile`` was made: ``networks`` of the profile's context
    networks (spread over its sizes; half of them with every width a multiple of the profile's blocked-kernel
    multiple, half not, where the profile has both) timed again end to end with the profile's protocol, against
    the times the profile recorded. Returns ``{"ratio": median now/then, "kinds": {"aligned"|"other": median
    now/then}, "networks": [{"then_ms", "now_ms", "aligned"}], "drifted": any of these beyond DRIFT_LIMIT_PCT %,
    "limit_pct", "profile_device": the CPU the profile names, "this_device": this machine's, "same_device"}``
    (a profile of another CPU model is compared all the same, and said so: its milliseconds were never this
    machine's). On a shared VM the host's load moves the latencies (BENCHMARKS.md, "Device tables on this CPU").
    A table's absolute milliseconds and a budget in ms do not survive a drift; its rankings, between networks on
    the blocked kernels and the others too, survive only one that moves both kinds alike, hence the two kinds
    apart. ``measure`` replaces :func:`cost_models.profiling.measure.measure_model` (tests)."""
    import statistics

    nets = [n for n in (profile.get("context") or {}).get("networks", []) if n.get("latency_ms")]
    if not nets:
        raise ValueError("profile: no context networks with an end-to-end time to compare against "
                         "(profile made before they existed, or not onnxruntime on a CPU): profile again")
    if networks < 1:
        raise ValueError(f"networks: expected at least 1, got {networks}")
    multiple = depthwise_multiple(profile) or channel_block(profile)
    aligned = [n for n in nets if _aligned(n["architecture"], multiple)]
    other = [n for n in nets if not _aligned(n["architecture"], multiple)]
    if aligned and other and networks >= 2:
        chosen = [(n, True) for n in _spread(aligned, networks // 2)]
        chosen += [(n, False) for n in _spread(other, networks - networks // 2)]
    else:
        chosen = [(n, _aligned(n["architecture"], multiple)) for n in _spread(nets, networks)]
    timer = measure if measure is not None else measure_model
    threads = threads if threads is not None else profile.get("device", {}).get("threads")
    rows = []
    by_kind: dict[str, list[float]] = {}
    for n, is_aligned in chosen:
        shape = tuple(n.get("input_shape") or (1, 3, 32, 32))
        now = timer(_seeded_model(n["architecture"]), shape, backend=profile.get("backend", "onnxruntime"),
                    meter="latency", threads=threads, time_budget_s=time_budget_s)["latency_ms"]["median"]
        rows.append({"then_ms": float(n["latency_ms"]["median"]), "now_ms": float(now), "aligned": is_aligned})
        by_kind.setdefault("aligned" if is_aligned else "other", []).append(float(now) / rows[-1]["then_ms"])
    ratio = statistics.median(r["now_ms"] / r["then_ms"] for r in rows)
    kinds = {kind: statistics.median(by_kind[kind]) for kind in ("aligned", "other") if kind in by_kind}
    drifted = any(abs(x - 1) * 100 > DRIFT_LIMIT_PCT for x in (ratio, *kinds.values()))
    if drifted:
        log.warning("this machine runs whole networks %.0f %% %s than when the profile was made (median of %d%s): "
                    "its milliseconds are off by that much; profile again for a budget in ms",
                    abs(ratio - 1) * 100, "faster" if ratio < 1 else "slower", len(rows),
                    "".join(f"; {kind} {100 * (x - 1):+.0f} %" for kind, x in kinds.items()))
    if len(kinds) == 2 and abs(kinds["aligned"] - kinds["other"]) * 100 > DRIFT_LIMIT_PCT:
        log.warning("aligned and other networks moved apart (%+.0f %% vs %+.0f %%): the table's rankings between "
                    "them no longer hold either", 100 * (kinds["aligned"] - 1), 100 * (kinds["other"] - 1))
    then_device, here = profile.get("device", {}).get("name"), cpu_name()
    same = then_device is None or then_device == here
    if not same:
        log.warning("the profile was made on %r, this machine is %r: the difference is between two machines, not "
                    "a drift of one", then_device, here)
    return {"ratio": ratio, "kinds": kinds, "networks": rows, "drifted": drifted, "limit_pct": DRIFT_LIMIT_PCT,
            "profile_device": then_device, "this_device": here, "same_device": same}
