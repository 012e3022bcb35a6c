"""End-to-end measurement of a whole network: the one protocol ``grow``, the benches and the
profile's validation share (docs/design.md §6).

The protocol: one onnxruntime session, warm-up, then ``rounds`` timed rounds; the figure is the
*median of the round medians* (robust to a round disturbed by other work on the machine), and the
rounds' spread is reported next to it. :func:`repeatability` measures several networks in
interleaved rounds (round 1 of every network, then round 2, …), so slow drifts of the machine show
up as disagreement between rounds: the profile records it and flags a noise floor worse than ±5 %.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cost_models.profile_io import BACKENDS
from cost_models.profiling.machine import default_threads
from cost_models.profiling.meters import NvmlEnergyMeter
from cost_models.profiling.runner import DEFAULT_WARMUP, Runner, check_choice, make_meter

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ROUNDS", "NOISE_LIMIT_PCT", "measure_model", "measure_rounds", "repeatability"]

#: Timed rounds per end-to-end measurement.
DEFAULT_ROUNDS = 5
#: A noise floor above this (± %, median over networks of two measurements' disagreement) is flagged.
NOISE_LIMIT_PCT = 5.0


def _round_stats(medians: Sequence[float], n: int) -> dict[str, Any]:
    med = statistics.median(medians)
    q = sorted(medians)
    lo, hi = q[len(q) // 4], q[(3 * len(q)) // 4] if len(q) > 1 else q[0]
    return {"median": med, "p25": min(lo, med), "p75": max(hi, med), "n": n, "rounds": list(medians),
            "spread_pct": 100 * (max(medians) - min(medians)) / med if med > 0 else 0.0}


def measure_rounds(run_once: Callable[[], None], *, meter: Any, rounds: int = DEFAULT_ROUNDS,
                   time_budget_s: float = 1.0, warmup: int = DEFAULT_WARMUP,
                   sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Latency stats (ms) of ``run_once``: median of ``rounds`` round medians, each round timed for
    ``time_budget_s / rounds`` seconds after one warm-up. ``rounds`` holds the round medians and
    ``spread_pct`` their range in % of the median. Energy (NVML) is the first round's."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: expected a positive integer, got {rounds!r}")
    medians, n, energy = [], 0, None
    for r in range(rounds):
        m = meter.measure(run_once, time_budget_s=time_budget_s / rounds, warmup=warmup if r == 0 else 0, sync=sync)
        medians.append(m.latency_ms.median)
        n += m.latency_ms.n
        if energy is None and m.energy_mj is not None:
            energy = m.energy_mj.to_dict()
    out = {"latency_ms": _round_stats(medians, n), "energy_mj": energy}
    return out


def repeatability(run_fns: Sequence[Callable[[], None]], *, meter: Any, rounds: int = DEFAULT_ROUNDS,
                  time_budget_s: float = 0.5, warmup: int = DEFAULT_WARMUP,
                  limit_pct: float = NOISE_LIMIT_PCT) -> dict[str, Any]:
    """How well the end-to-end protocol repeats here: each of ``run_fns`` (one network each) measured
    twice with :func:`measure_rounds` (``rounds`` rounds, ``time_budget_s`` seconds per measurement),
    the two passes interleaved (every network once, then every network again) so that a drift of the
    machine between them shows. Per network the disagreement is ``100 · |a / b − 1|`` (%), the
    statistic the benches report as "re-measured within ±10 %"; ``noise_floor_pct`` is its median
    over networks, ``p90_pct`` and ``worst_pct`` its tail; ``noisy`` is true when the noise floor is
    above ``limit_pct`` (and a warning is logged). ``round_spread_pct`` (median over networks of the
    rounds' range, % of the median) is reported for information: single rounds disagree more than the
    median of rounds a measurement delivers, which is why it is not what is judged."""
    if not run_fns:
        raise ValueError("repeatability: no network to measure")
    passes: list[list[dict[str, Any]]] = [[], []]
    for p in range(2):
        for fn in run_fns:
            passes[p].append(measure_rounds(fn, meter=meter, rounds=rounds, time_budget_s=time_budget_s,
                                            warmup=warmup if p == 0 else 1)["latency_ms"])
    dev = []
    for a, b in zip(*passes):
        dev.append(100 * abs(a["median"] / b["median"] - 1) if b["median"] > 0 else 0.0)
    ranked = sorted(dev)
    floor = statistics.median(dev)
    out = {"networks": len(run_fns), "rounds": rounds, "measurement_s": time_budget_s, "deviation_pct": dev,
           "noise_floor_pct": floor, "p90_pct": ranked[min(len(ranked) - 1, int(0.9 * len(ranked)))],
           "worst_pct": ranked[-1], "limit_pct": limit_pct, "noisy": floor > limit_pct,
           "round_spread_pct": statistics.median(m["spread_pct"] for p in passes for m in p)}
    if out["noisy"]:
        log.warning("this machine does not repeat: measuring the same network twice differs by ±%.1f %% "
                    "(median over %d networks; limit ±%.0f %%). Use fewer threads (--threads 1) or a quieter "
                    "machine; costs measured now record noise", floor, len(run_fns), limit_pct)
    return out


def measure_model(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "cpu",
                  backend: str = "onnxruntime", meter: str = "latency", threads: int | None = None,
                  time_budget_s: float = 1.0, warmup: int = DEFAULT_WARMUP, nvml: Any = None,
                  meter_options: dict[str, Any] | None = None, rounds: int = DEFAULT_ROUNDS) -> dict[str, Any]:
    """End-to-end latency (and energy with ``meter="nvml"``) of one inference of ``model``.

    The model is copied, put in eval mode and exported as is (onnxruntime folds BatchNorm into the
    convolutions). Returns ``{"latency_ms": stats, "energy_mj": stats | None}``; the latency is the
    median of ``rounds`` round medians (:func:`measure_rounds`), with the rounds next to it.
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
        runner = Runner(module, example, backend=backend, device=device, threads=threads)
        try:
            return measure_rounds(runner.run_once, meter=meter_obj, rounds=rounds, time_budget_s=time_budget_s,
                                  warmup=warmup, sync=runner.sync)
        finally:
            runner.close()
    finally:
        if isinstance(meter_obj, NvmlEnergyMeter):
            meter_obj.close()
