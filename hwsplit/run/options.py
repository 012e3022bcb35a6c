"""From a command's option values to what the library runs: the settings of a new or resumed grow run (with
its budget in the cost model's unit and that cost model, built once), and a profile's fit report.

The command line (``cli.py``) only parses options, calls these and the run commands, and prints; every rule
about settings stays in :mod:`hwsplit.run.config` (docs/design.md §1, §5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from hwsplit.infra.parallel import on_main
from hwsplit.run.config import GrowConfig, config_like, load_config, parse_budget, recipe_settings
from hwsplit.run.session import build_cost_model


def grow_settings(fields: Mapping[str, Any], *, budget: str | None = None, recipe: str | None = None,
                  selection: Mapping[str, Any] | None = None) -> tuple[GrowConfig, Any]:
    """The :class:`~hwsplit.run.config.GrowConfig` of a new grow run, and its cost model.

    ``fields``: GrowConfig fields (without ``budget`` and the selection-recipe fields). ``budget``: the
    absolute budget as text with its unit (``"4.5ms"``, ``"300M"``), parsed in the unit of the run's cost
    model (:func:`~hwsplit.run.config.parse_budget`). ``recipe`` and ``selection`` (the selection options given
    beside it: price, group budgets, ceilings, LP threshold, layer cap): :func:`~hwsplit.run.config.recipe_settings`.
    Which cost options combine is checked before a profile is read; the cost model is built once
    (:func:`~hwsplit.run.session.build_cost_model`): pass it on, ``grow(config, out, cost_model=...)``.
    """
    cost = fields.get("cost", GrowConfig.cost)
    cost_options = dict(fields.get("cost_options", {}))
    probe = GrowConfig(cost=cost, cost_options=cost_options)  # which cost options combine, before reading a profile
    cost_model = build_cost_model(probe)
    budget_value = parse_budget(budget, cost_model.unit) if budget is not None else None
    config = GrowConfig(**fields, budget=budget_value,
                        **recipe_settings(recipe, dict(selection or {}), selection=fields.get("selection", "lp")))
    return config, cost_model


def width_settings(like: str | Path | None, fields: Mapping[str, Any], *, given: Collection[str]) -> GrowConfig:
    """The settings of a width baseline (``baseline width``): without ``like``, ``fields`` (GrowConfig fields, the
    options' values whether given or default) over the defaults; with ``like`` (a grow run), that run's settings with
    only the fields in ``given`` (those the user set) replaced, so the widths train on the run's schedule and data.
    ``model_options`` merge into the run's (:func:`~hwsplit.run.config.config_like`)."""
    overrides = {k: v for k, v in fields.items() if like is None or k in given}
    return config_like(like, overrides)


def resume_settings(run: str | Path, *, stages: int | None = None, threads: int | None = None) -> GrowConfig:
    """The settings ``grow --resume RUN`` continues with: RUN's config.json (read by rank 0, shared with the
    others), with ``stages`` (to extend the run) and ``threads`` replaced when given."""
    config = on_main(load_config, run, share=True)  # the run directory is rank 0's
    changes = {k: v for k, v in (("stages", stages), ("threads", threads)) if v is not None}
    return dataclasses.replace(config, **changes) if changes else config


def fit_profile(path: str | Path, *, metric: str | None = None, test_size: float = 0.25,
                seed: int = 0) -> dict[str, Any]:
    """The layer-cost regressor fitted on the profile ``path`` and its held-out accuracy
    (:func:`cost_models.predictor.fit_report`); ``metric`` defaults to ``energy_mj`` when the profile measured
    energy, else ``latency_ms``."""
    from cost_models.predictor import fit_report
    from cost_models.profile_io import load_profile

    data = load_profile(path)
    if metric is None:
        metric = "energy_mj" if any("energy_mj" in r for r in data["rows"]) else "latency_ms"
    return fit_report(data, metric, test_size=test_size, seed=seed)


__all__ = ["fit_profile", "grow_settings", "resume_settings", "width_settings"]
