"""Baselines recorded in the same run-directory format as growth, so reports compare them point for point.

* :func:`random_selection` — the ``--selection random`` baseline of the stage loop: neurons drawn
  uniformly at random among *all* neurons of the scored groups (whatever their splitting index),
  seeded, under the same budget, layer caps and cost model as the knapsack. Only *which* neurons
  are split changes: offspring still move along the eigenvectors from scoring.
* :func:`width_baseline` — the family scaled uniformly by width multipliers, each network trained
  from scratch on one schedule, written as a run directory whose ``stages.jsonl`` has one record
  per multiplier (``"stage"`` = index, plus ``"width_mult"`` and ``"epochs"``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from hwsplit.grow import GrowConfig

log = logging.getLogger(__name__)

_BUDGET_RTOL = 1e-9


def _cap(name: str, caps: float | int | Mapping[str, float | int | None] | None, width: int) -> int:
    """Most neurons of a group with ``width`` channels that may be chosen (same rule as hwsplit.select)."""
    value = caps.get(name) if isinstance(caps, Mapping) else caps
    if value is None:
        return width
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"caps[{name!r}]: expected a positive number, got {value!r}")
    if isinstance(value, float) and value <= 1:
        return max(1, int(math.floor(value * width)))
    return min(width, int(value))


def random_selection(widths: Mapping[str, int], costs: Mapping[str, float], budget: float, *,
                     caps: float | int | Mapping[str, float | int | None] | None = None,
                     seed: int | Sequence[int] = 0) -> dict[str, torch.Tensor]:
    """Neurons chosen uniformly at random under a budget: ``{group: sorted LongTensor of channels}``.

    Every neuron ``j < widths[name]`` of every group is a candidate, whatever its splitting index.
    They are visited in one uniformly random order (``numpy.random.default_rng(seed)``) and each is
    taken when its marginal cost ``costs[name]`` still fits the remaining ``budget`` and its group's
    cap (``caps`` as in :func:`hwsplit.select.select_neurons`: a fraction in (0, 1] of the width,
    an integer, or a mapping per group). Deterministic for a given ``seed``. Groups with no chosen
    neuron are left out; ``{}`` when nothing fits. ``ValueError`` names a missing or non-positive
    cost or a negative width.
    """
    import torch

    if math.isnan(budget):
        raise ValueError("budget: NaN")
    names = list(widths)
    for name in names:
        w = widths[name]
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"widths[{name!r}]: expected a non-negative integer, got {w!r}")
        if name not in costs:
            raise ValueError(f"costs: no cost given for group {name!r}")
        c = costs[name]
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"costs[{name!r}]: expected a finite positive number, got {c!r}")
    if budget <= 0 or not names:
        return {}
    group_of = np.concatenate([np.full(widths[n], i, dtype=np.int64) for i, n in enumerate(names)])
    channel = np.concatenate([np.arange(widths[n], dtype=np.int64) for n in names])
    order = np.random.default_rng(seed).permutation(group_of.size)
    limit = budget + _BUDGET_RTOL * max(1.0, abs(budget))
    caps_left = [_cap(n, caps, widths[n]) for n in names]
    cost = [float(costs[n]) for n in names]
    used = 0.0
    chosen: dict[str, list[int]] = {}
    for k in order:
        g = int(group_of[k])
        if caps_left[g] == 0 or used + cost[g] > limit:
            continue
        used += cost[g]
        caps_left[g] -= 1
        chosen.setdefault(names[g], []).append(int(channel[k]))
    log.info("random selection: %d neurons, %.4g of budget %.4g", sum(map(len, chosen.values())), used, budget)
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in chosen.items()}


# --------------------------------------------------------------------------------------------
# Width-multiplier baseline
# --------------------------------------------------------------------------------------------

WIDTH_BASELINE = "width"


def grow_epochs(config: GrowConfig) -> int:
    """Training epochs a grow run of ``config`` spends on its final network: seed + stages × epochs."""
    return (config.seed_epochs or config.epochs) + config.stages * config.epochs


def parse_multipliers(text: str | Sequence[float]) -> list[float]:
    """``"0.25,0.5,1"`` (or a sequence) as positive floats; ``ValueError`` naming ``multipliers``."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"multipliers: cannot read {item!r} as a number (e.g. 0.25,0.5,1)") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"multipliers: expected positive numbers, got {item!r}")
        values.append(value)
    if not values:
        raise ValueError("multipliers: at least one is needed")
    if len(set(values)) != len(values):
        raise ValueError(f"multipliers: {text!r} lists a multiplier twice")
    return values


def width_baseline(config: GrowConfig, multipliers: Sequence[float], out: str | Path, *,
                   epochs: int | None = None, progress: Callable | None = None,
                   on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``config``'s seed family scaled by each multiplier from scratch; write a run directory.

    Multiplier ``m`` scales the widths of the seed ``grow`` would start from (its ``width_mult``
    times ``m``; for ``mlp`` the hidden widths), so ``1.0`` is the seed itself and, with
    ``--config standard``, the multipliers are the MobileNet paper's. Each network is trained for
    ``epochs`` (default :func:`grow_epochs`: what a grow run of the same settings spends on its
    final network) in one schedule of ``config``'s kind (SGD, cosine by default), from the same
    initial seed (``config.seed * 1000``) and the same data order as grow's stage 0.

    ``out`` gets ``config.json`` (``config``'s fields plus ``"baseline": "width"``,
    ``"multipliers"``, ``"total_epochs"``), ``stages.jsonl`` (one record per multiplier, with the
    keys of a grow seed record plus ``"width_mult"`` and ``"epochs"``), ``stage-K.pt`` and
    ``summary.md``, all written atomically. Returns the records.
    """
    from hwsplit import grow as g

    multipliers = parse_multipliers(multipliers)
    total = grow_epochs(config) if epochs is None else epochs
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    run = g.RunDir(out)
    g.start_fresh(run)
    info = {**config.to_dict(), "baseline": WIDTH_BASELINE, "multipliers": multipliers, "total_epochs": total}
    g.atomic_write_json(run.config, info)
    session = g.open_session(config)
    records: list[dict[str, Any]] = []
    title = f"width baseline: {config.model} on {config.dataset} × {', '.join(f'{m:g}' for m in multipliers)}"
    index = 0
    try:
        for index, mult in enumerate(multipliers):
            g.seed_everything(g.stage_seed(config, 0))
            model = g.build_seed(config, session.bundle, width_mult=mult).to(session.device)
            timings: dict[str, float] = {}
            record = g.train_and_record(session, model, index, epochs=total, loader_epoch=0, timings=timings,
                                        progress=progress,
                                        extra={"width_mult": mult, "epochs": total, "split": {}, "neurons_split": 0})
            g.write_stage(run, session, model, record, records)
            g.write_summary(run, config, records, status="running", title=title)
            log.info("width ×%g: test top-1 %.4f, %.4g MACs", mult, record["test_top1"], record["macs"])
            if on_stage:
                on_stage(record)
    except (FloatingPointError, g.WriteFailed) as err:
        reason = f"failed at width ×{multipliers[index]:g}: {err}"
        g.write_summary(run, config, records, status=reason, title=title, safe=True)
        raise g.StageFailed(f"{reason}; {len(records)} network(s) in {run.path} are complete",
                            stage=index, run=run.path) from None
    except KeyboardInterrupt:
        g.write_summary(run, config, records, status=f"interrupted at width ×{multipliers[index]:g}", title=title,
                        safe=True)
        raise
    g.write_summary(run, config, records, status="done", title=title)
    return records


def is_baseline(config: Mapping[str, Any]) -> bool:
    return bool(config.get("baseline"))


def read_config(path: str | Path) -> dict[str, Any]:
    """A run directory's config.json as a dict; ``ValueError`` naming the file if absent or malformed."""
    path = Path(path) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"run: {path} does not exist (not an hwsplit run directory)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"run: {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"run: {path} does not hold a JSON object")
    return data


__all__ = ["grow_epochs", "parse_multipliers", "random_selection", "read_config", "width_baseline"]
