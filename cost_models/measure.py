"""The measurement protocol: interleaved rounds, median of round medians, repeatability recorded
(docs/design.md §6). ``grow`` (after every stage), the benches and the profiler all measure through it.

One *round* times every workload of a set once (``time_budget_s / rounds`` seconds each, in an
order reshuffled per round); after ``rounds`` rounds a workload's latency is the median of its round
medians, and its *spread* is the largest distance of one round median from that value, in percent
(``spread_pct``: "repeats within ±spread_pct %"). Interleaving spreads a slow drift of the machine
(another process, frequency scaling) over every workload instead of biasing the ones timed during
it, and the spread measures how far one measurement can be trusted: on a 2-vCPU VM with 2 intra-op
threads the same network's round medians differed by 2.5× (issue 11), with 1 thread by ≤ 3 %.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cost_models.machine import check_choice, default_threads, make_meter
from cost_models.meters import Measurement, NvmlEnergyMeter, Stats
from cost_models.profile_io import BACKENDS
from cost_models.runner import DEFAULT_WARMUP, Runner, layer_module
from hwsplit.specs import LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ROUNDS", "NOISE_FLOOR_PCT", "RepeatedMeasurement", "measure_interleaved", "measure_layers",
           "measure_model", "measure_models", "measure_modules", "repeatability_summary"]

#: Rounds per measurement (each workload gets ``time_budget_s / rounds`` seconds per round).
DEFAULT_ROUNDS = 5
#: A profile whose end-to-end measurements repeat worse than ±this many percent is flagged.
NOISE_FLOOR_PCT = 5.0
#: Warm-up runs before every round after the first (the first uses the caller's ``warmup``):
#: the session was cold in the cache after the other workloads ran.
ROUND_WARMUP = 2


@dataclass(frozen=True)
class RepeatedMeasurement:
    """A workload measured in ``len(rounds_ms)`` rounds. ``latency_ms.median`` is the median of the
    round medians (ms); ``p25``/``p75`` the medians of the rounds' quartiles; ``n`` all timed runs.
    ``spread_pct``: max |round median − median| / median × 100 (None with a single round)."""

    latency_ms: Stats
    rounds_ms: list[float]
    spread_pct: float | None
    energy_mj: Stats | None = None
    idle_power_w: float | None = None
    method: str = "wallclock"
    rounds_mj: list[float] = field(default_factory=list)

    def repeat_entry(self) -> dict[str, Any]:
        """What a profile row or a stage record stores about the repeatability of this value."""
        entry: dict[str, Any] = {"rounds_ms": [round(v, 6) for v in self.rounds_ms], "spread_pct": self.spread_pct}
        if self.rounds_mj:
            entry["rounds_mj"] = [round(v, 6) for v in self.rounds_mj]
        return entry


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


def _combine(stats: list[Stats]) -> tuple[Stats, float | None]:
    medians = [s.median for s in stats]
    med = _median(medians)
    p25 = min(_median([s.p25 for s in stats]), med)
    p75 = max(_median([s.p75 for s in stats]), med)
    spread = None
    if len(stats) > 1 and med > 0:
        spread = 100.0 * max(abs(m - med) for m in medians) / med
    return Stats(median=med, p25=p25, p75=p75, n=sum(s.n for s in stats)), spread


def measure_interleaved(runners: Sequence[Any], meter: Any, *, rounds: int = DEFAULT_ROUNDS, time_budget_s: float,
                        warmup: int = DEFAULT_WARMUP, seed: int = 0) -> list[RepeatedMeasurement]:
    """Measure every runner (an object with ``run_once`` and ``sync``) in ``rounds`` interleaved
    rounds with ``meter``; ``time_budget_s`` is each runner's total timed period (s), split evenly
    over the rounds. Returns one :class:`RepeatedMeasurement` per runner, in order."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    if not time_budget_s >= 0:
        raise ValueError(f"time_budget_s: expected >= 0, got {time_budget_s!r}")
    per_round: list[list[Measurement]] = [[] for _ in runners]
    order = list(range(len(runners)))
    rng = random.Random(seed)
    for r in range(rounds):
        if r:
            rng.shuffle(order)
        for i in order:
            runner = runners[i]
            per_round[i].append(meter.measure(runner.run_once, time_budget_s=time_budget_s / rounds,
                                              warmup=warmup if r == 0 else min(warmup, ROUND_WARMUP),
                                              sync=runner.sync))
    out = []
    for ms in per_round:
        latency, spread = _combine([m.latency_ms for m in ms])
        energy, rounds_mj = None, []
        if all(m.energy_mj is not None for m in ms):
            energy, _ = _combine([m.energy_mj for m in ms])  # type: ignore[misc]
            rounds_mj = [m.energy_mj.median for m in ms]  # type: ignore[union-attr]
        idle = [m.idle_power_w for m in ms if m.idle_power_w is not None]
        out.append(RepeatedMeasurement(latency_ms=latency, rounds_ms=[m.latency_ms.median for m in ms],
                                       spread_pct=spread, energy_mj=energy,
                                       idle_power_w=_median(idle) if idle else None,
                                       method=ms[0].method, rounds_mj=rounds_mj))
    return out


def repeatability_summary(spreads: Sequence[float | None], threshold_pct: float = NOISE_FLOOR_PCT) -> dict[str, Any]:
    """Summary of per-workload spreads (%): median, 90th percentile, max, and the share of workloads
    repeating within ±``threshold_pct`` %. Workloads measured in one round are not counted."""
    values = sorted(float(s) for s in spreads if s is not None and math.isfinite(s))
    if not values:
        return {"n": 0}
    p90 = values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]
    return {"n": len(values), "median_pct": round(_median(values), 3), "p90_pct": round(p90, 3),
            "max_pct": round(values[-1], 3),
            "within_threshold": round(sum(v <= threshold_pct for v in values) / len(values), 4)}


def measure_modules(items: Sequence[tuple[Any, Any]], *, backend: str, device: str, meter: Any, threads: int,
                    rounds: int, time_budget_s: float, warmup: int) -> list[RepeatedMeasurement]:
    """Measure ``(module, example)`` pairs, each in its own :class:`~cost_models.runner.Runner`, interleaved."""
    runners: list[Runner] = []
    try:
        for module, example in items:
            runners.append(Runner(module, example, backend=backend, device=device, threads=threads))
        return measure_interleaved(runners, meter, rounds=rounds, time_budget_s=time_budget_s, warmup=warmup)
    finally:
        for runner in runners:
            runner.close()


def measure_layers(specs: Sequence[LayerSpec], *, backend: str, device: str, meter: Any, threads: int,
                   time_budget_s: float, warmup: int = DEFAULT_WARMUP, activation: str = "silu",
                   rounds: int = DEFAULT_ROUNDS) -> list[RepeatedMeasurement]:
    """Measure layers as deployed (:func:`cost_models.runner.layer_module`), interleaved."""
    return measure_modules([layer_module(s, activation) for s in specs], backend=backend, device=device, meter=meter,
                         threads=threads, rounds=rounds, time_budget_s=time_budget_s, warmup=warmup)


def _check(backend: str, threads: int | None, input_shape: Any) -> int:
    check_choice("backend", backend, BACKENDS)
    if threads is None:
        threads = default_threads()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {threads!r}")
    if not isinstance(input_shape, (tuple, list)) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape: expected a tuple of positive integers, got {input_shape!r}")
    return threads


def _prepared(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Module, Any]:
    import copy

    import torch

    module = copy.deepcopy(model).cpu().eval()
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(dtype)
    return module, example


def _result(m: RepeatedMeasurement) -> dict[str, Any]:
    energy = m.energy_mj.to_dict() if m.energy_mj is not None else None
    return {"latency_ms": m.latency_ms.to_dict(), "energy_mj": energy, "repeat": m.repeat_entry()}


def measure_models(models: Sequence[nn.Module], input_shape: tuple[int, ...], *, device: str = "cpu",
                   backend: str = "onnxruntime", meter: str = "latency", threads: int | None = None,
                   time_budget_s: float = 1.0, warmup: int = DEFAULT_WARMUP, rounds: int = DEFAULT_ROUNDS,
                   nvml: Any = None, meter_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """End to end, interleaved: one :func:`measure_model` result per model, all timed in the same
    rounds (the benches' protocol: a drift of the machine touches every network alike)."""
    threads = _check(backend, threads, input_shape)
    meter_obj = make_meter(meter, device, nvml=nvml, **(meter_options or {}))
    try:
        ms = measure_modules([_prepared(m, input_shape) for m in models], backend=backend, device=device,
                           meter=meter_obj, threads=threads, rounds=rounds, time_budget_s=time_budget_s,
                           warmup=warmup)
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()
    return [_result(m) for m in ms]


def measure_model(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "cpu",
                  backend: str = "onnxruntime", meter: str = "latency", threads: int | None = None,
                  time_budget_s: float = 1.0, warmup: int = DEFAULT_WARMUP, rounds: int = DEFAULT_ROUNDS,
                  nvml: Any = None, meter_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """End-to-end latency (and energy with ``meter="nvml"``) of one inference of ``model``, in
    ``rounds`` rounds of ``time_budget_s / rounds`` seconds.

    The model is copied, put in eval mode and exported as is (onnxruntime folds BatchNorm into the
    convolutions). Returns ``{"latency_ms": stats, "energy_mj": stats | None, "repeat": {"rounds_ms":
    [...], "spread_pct": ...}}`` (latency in ms, the median being the median of round medians).
    """
    return measure_models([model], input_shape, device=device, backend=backend, meter=meter, threads=threads,
                          time_budget_s=time_budget_s, warmup=warmup, rounds=rounds, nvml=nvml,
                          meter_options=meter_options)[0]
