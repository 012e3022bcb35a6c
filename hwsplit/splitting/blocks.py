"""Hardware-aligned growth: every stage adds to each layer a multiple of N channels (docs/design.md §3).

A backend that runs convolutions in channel blocks (onnxruntime's NCHWc kernels: 16 channels on
AVX-512, 8 on AVX2) pads every layer up to the block, so a layer of 17 channels costs what one of 32
costs. Growth that moves in blocks never pays for padding. This module holds the pure parts:

* :func:`solve_grouped_knapsack` — the *grouped* knapsack over per-layer options. Layer ``l``
  offers counts ``0, N, 2N, …``; option ``k`` has value ``V_lk`` (Σλ of the ``kN`` most negative
  neurons) and cost ``C_lk`` (the cost model's total with that layer ``kN`` channels wider, minus
  the current total, so steps at block boundaries count). We solve::

      minimise Σ_lk V_lk x_lk   subject to   Σ_lk C_lk x_lk ≤ B,   Σ_k x_lk ≤ 1 per layer,   x_lk ∈ {0, 1}

  exactly with scipy ``milp`` (HiGHS) or by its LP relaxation and rounding;
* :func:`select_blocks` — the stage loop's selection in blocks: options from the scores, option
  costs from a ``total(model)`` callable, the knapsack, then whole blocks dropped until the joint
  cost of the plan fits the budget.

**Fewer than N negative neurons.** A block is the layer's next N neurons in order of splitting index,
most negative first; it is offered when the *sum* of their indices is negative. So a layer with
fewer than N negative neurons can still take a block (its remaining neurons, the least positive
ones, are split too: a split is function-preserving whatever its index, and the block's net
predicted loss change ε²Σλ/2 is negative); a layer whose best block sums to ≥ 0, whose width is
below N, or whose cap (``max_layer_growth``) is below N does not grow in that stage. Each neuron is
split at most once per stage, so a layer of width w takes at most ⌊w/N⌋ blocks.

Pure numpy/scipy plus torch for the model copies; no cost model is imported (costs come from a
callable), so this stays in the splitting layer (docs/design.md §1).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from hwsplit.splitting.knapsack import budget_limit, price_transform, search_price_budget
from hwsplit.splitting.select import cap_value

log = logging.getLogger(__name__)

GROUPED_METHODS = ("lp", "milp", "greedy")
_LP_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# The grouped knapsack
# --------------------------------------------------------------------------------------------

def _check_options(values: Sequence[Any], costs: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(values) != len(costs):
        raise ValueError(f"values and costs: {len(values)} layers of values, {len(costs)} of costs")
    vs, cs = [], []
    for layer, (v, c) in enumerate(zip(values, costs)):
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if v.shape != c.shape:
            raise ValueError(f"layer {layer}: {v.size} option values, {c.size} option costs")
        if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c))):
            raise ValueError(f"layer {layer}: option values and costs must be finite")
        vs.append(v)
        cs.append(c)
    return vs, cs


def _objective(choice: Sequence[int], values: Sequence[np.ndarray]) -> float:
    return float(sum(values[li][k - 1] for li, k in enumerate(choice) if k))


def _used(choice: Sequence[int], costs: Sequence[np.ndarray]) -> float:
    return float(sum(costs[li][k - 1] for li, k in enumerate(choice) if k))


def _upgrade_greedy(choice: list[int], values: Sequence[np.ndarray], costs: Sequence[np.ndarray],
                    limit: float) -> list[int]:
    """Move layers to better options one at a time, best value gained per cost added first, while it fits."""
    choice = list(choice)
    while True:
        used = _used(choice, costs)
        best, best_key = None, None
        for li, k in enumerate(choice):
            v0 = values[li][k - 1] if k else 0.0
            c0 = costs[li][k - 1] if k else 0.0
            for k2 in range(k + 1, len(values[li]) + 1):
                dv, dc = values[li][k2 - 1] - v0, costs[li][k2 - 1] - c0
                if dv >= 0 or used + dc > limit:
                    continue
                key = (dv / dc if dc > 0 else -math.inf, dv)  # a free improvement first
                if best_key is None or key < best_key:
                    best, best_key = (li, k2), key
        if best is None:
            return choice
        choice[best[0]] = best[1]


def _repair(choice: list[int], values: Sequence[np.ndarray], costs: Sequence[np.ndarray], limit: float) -> list[int]:
    """Step layers down one option at a time, least value lost per cost freed first, until it fits."""
    choice = list(choice)
    while _used(choice, costs) > limit:
        best, best_key = None, None
        for li, k in enumerate(choice):
            if not k:
                continue
            v1 = values[li][k - 2] if k > 1 else 0.0
            c1 = costs[li][k - 2] if k > 1 else 0.0
            freed, lost = costs[li][k - 1] - c1, v1 - values[li][k - 1]
            if freed <= 0:
                continue
            key = lost / freed
            if best_key is None or key < best_key:
                best, best_key = li, key
        if best is None:  # nothing frees anything: drop everything
            return [0] * len(choice)
        choice[best] -= 1
    return choice


def solve_grouped_knapsack(values: Sequence[Any], costs: Sequence[Any], budget: float, *, method: str = "milp",
                           time_limit_s: float | None = None,
                           lp_threshold: float | None = None) -> tuple[list[int], float | None]:
    """Choose at most one option per layer minimising ``Σ value`` under ``Σ cost ≤ budget``.

    Args:
        values: per layer, the values of its options 1..K (option 0 — grow nothing — is implicit:
            value 0, cost 0). A value is the option's whole Σλ, not its increment; options with
            value ≥ 0 are never chosen.
        costs: per layer, the costs of the same options (whole cost of that option, any finite
            number: a block that crosses no padding boundary may cost ~0).
        budget: total cost allowed; ``inf``: no budget; ``<= 0``: nothing is chosen.
        method: ``"milp"`` (exact, HiGHS), ``"lp"`` (LP relaxation, rounding: the largest option of
            each layer's fractional solution, stepped down until it fits, then greedy upgrades;
            the best of that, the greedy alone and the best single option) or ``"greedy"``.
        time_limit_s: HiGHS wall-clock limit (None: none).
        lp_threshold: ``"lp"`` only, the authors' rounding: each layer takes its largest option whose LP
            value is at least this (in (0, 1]), stepped down until it fits, and nothing else (no
            upgrades, no best-of); None: the rounding above.

    Returns:
        ``(choice, lp_bound)``: the chosen option per layer (0 = none), always within the budget;
        ``lp_bound`` the LP optimum (a lower bound on the objective) for ``"lp"``, else None.
    """
    if method not in GROUPED_METHODS:
        raise ValueError(f"method: expected one of {GROUPED_METHODS}, got {method!r}")
    if math.isnan(budget):
        raise ValueError("budget: NaN")
    vs, cs = _check_options(values, costs)
    n_layers = len(vs)
    none = [0] * n_layers
    if budget <= 0 or n_layers == 0:
        return none, None
    limit = budget_limit(budget)
    # variables: the options worth anything that fit alone
    var = [(li, k) for li in range(n_layers) for k in range(1, vs[li].size + 1)
           if vs[li][k - 1] < 0 and cs[li][k - 1] <= limit]
    if not var:
        return none, None
    greedy = _upgrade_greedy(none, vs, cs, limit)
    if method == "greedy":
        return greedy, None
    c = np.array([vs[li][k - 1] for li, k in var])
    a_cost = np.array([cs[li][k - 1] for li, k in var])
    rows = np.zeros((n_layers, len(var)))
    for j, (li, _) in enumerate(var):
        rows[li, j] = 1.0
    used_layers = rows.any(axis=1)
    A = np.vstack([a_cost[None, :], rows[used_layers]])
    ub = np.concatenate([[budget if math.isfinite(budget) else np.inf], np.ones(int(used_layers.sum()))])
    options = {} if time_limit_s is None else {"time_limit": float(time_limit_s)}
    if method == "milp":
        res = milp(c, constraints=LinearConstraint(A, -np.inf, ub), integrality=np.ones(len(var)),
                   bounds=Bounds(0, 1), options={**options, "mip_rel_gap": 0.0})
        if res.x is None:
            log.warning("grouped milp found no solution (%s); using the greedy", res.message)
            return greedy, None
        choice = list(none)
        for j in np.flatnonzero(res.x > 0.5):
            li, k = var[j]
            choice[li] = max(choice[li], k)
        choice = _repair(choice, vs, cs, limit)
        if res.status != 0:  # stopped early: never worse than the greedy
            log.warning("grouped milp stopped early (%s)", res.message)
            choice = min((choice, greedy), key=lambda ch: _objective(ch, vs))
        return choice, None
    res = linprog(c, A_ub=A[:, :], b_ub=np.where(np.isfinite(ub), ub, 1e300), bounds=(0, 1), method="highs",
                  options=options)
    if res.status != 0 or res.x is None:
        log.warning("grouped lp failed (%s); using the greedy", res.message)
        return greedy, None
    rounded = list(none)
    if lp_threshold is not None:  # the authors' rule: options with x >= threshold, nothing else
        for j in np.flatnonzero(res.x >= lp_threshold - _LP_TOL):
            li, k = var[j]
            rounded[li] = max(rounded[li], k)
        return _repair(rounded, vs, cs, limit), float(res.fun)
    for j in np.flatnonzero(res.x > _LP_TOL):
        li, k = var[j]
        rounded[li] = max(rounded[li], k)  # the largest option with any weight, then stepped down
    rounded = _upgrade_greedy(_repair(rounded, vs, cs, limit), vs, cs, limit)
    single = list(none)
    j = int(np.argmin(c))
    single[var[j][0]] = var[j][1]
    best = min((rounded, greedy, single), key=lambda ch: _objective(ch, vs))
    return best, float(res.fun)


def brute_force_grouped(values: Sequence[Any], costs: Sequence[Any], budget: float) -> tuple[list[int], float]:
    """Every combination of options (small instances only, for tests): the best choice and its objective."""
    vs, cs = _check_options(values, costs)
    limit = budget_limit(budget)
    best, best_obj = [0] * len(vs), 0.0
    if budget <= 0:
        return best, best_obj
    for choice in itertools.product(*[range(v.size + 1) for v in vs]):
        if _used(choice, cs) <= limit:
            obj = _objective(choice, vs)
            if obj < best_obj - 1e-12:
                best, best_obj = list(choice), obj
    return best, best_obj


# --------------------------------------------------------------------------------------------
# Selection in blocks for the stage loop
# --------------------------------------------------------------------------------------------

@dataclass
class LayerBlocks:
    """One layer's options: ``counts[k-1] = k·N`` channels, the neurons in split order, Σλ and cost per option."""

    name: str
    width: int
    order: np.ndarray  # channel indices, most negative index first
    counts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)


def block_options(name: str, eigenvalues: Any, multiple: int, cap: Any = None) -> LayerBlocks:
    """The options ``N, 2N, …`` of one layer (see the module docstring for which are offered)."""
    ev = eigenvalues.detach().cpu().double().numpy() if hasattr(eigenvalues, "detach") else np.asarray(eigenvalues)
    ev = np.asarray(ev, dtype=np.float64).reshape(-1)
    order = np.argsort(ev, kind="stable")
    most = min(ev.size, cap_value(f"[{name!r}]", cap, ev.size))
    out = LayerBlocks(name=name, width=int(ev.size), order=order)
    total = 0.0
    for k in range(1, int(most // multiple) + 1):
        block = float(ev[order[(k - 1) * multiple:k * multiple]].sum())
        if not block < 0:
            break  # blocks are sorted: every later block sums to more
        total += block
        out.counts.append(k * multiple)
        out.values.append(total)
    return out


def option_costs(model: Any, groups: Mapping[str, Any] | list[Any], layers: Sequence[LayerBlocks],
                 total: Callable[[Any], float], current: float) -> None:
    """Fill each layer's ``costs``: the cost model's total with that layer alone ``count`` channels wider,
    minus ``current`` (new channels appended by :func:`hwsplit.network.resize.resize_groups`; only widths matter)."""
    from hwsplit.network.resize import resize_groups

    for layer in layers:
        layer.costs = []
        if not layer.counts:
            continue
        wider = copy.deepcopy(model)
        for count in layer.counts:
            resize_groups(wider, {layer.name: layer.width + count}, groups)
            layer.costs.append(float(total(wider)) - current)


def _plan(layers: Sequence[LayerBlocks], choice: Sequence[int]) -> dict[str, Any]:
    import torch

    return {lb.name: torch.as_tensor(np.sort(lb.order[:lb.counts[k - 1]]), dtype=torch.long)
            for lb, k in zip(layers, choice) if k}


def select_blocks(model: Any, scores: Mapping[str, Any], groups: Mapping[str, Any] | list[Any], *,
                  total: Callable[[Any], float], current: float, budget: float, multiple: int,
                  caps: Any = None, method: str = "lp",
                  increase: Callable[[dict[str, Any]], float] | None = None,
                  max_rounds: int = 100, price: str = "linear", reference: float = 1.0,
                  lp_threshold: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose per-layer multiples of ``multiple`` channels to split under ``budget``.

    ``total(model)`` is the cost model's total (its unit), ``current`` that of ``model``. With
    ``increase(plan)`` (the real cost increase of a plan, all layers together), whole blocks are
    dropped — the one with the least Σλ per unit of its own cost first — until it fits: per-layer
    option costs omit the cross terms of neighbouring layers that grow together. ``caps`` is
    ``max_layer_growth`` (the rule of :func:`hwsplit.splitting.select.select_neurons`). Returns
    ``(plan, info)``: ``{group: sorted LongTensor of channels}`` (every count a multiple of
    ``multiple``) and ``{"counts", "objective", "cost_used", "lp_bound", "multiple"}``.

    ``price`` other than ``"linear"`` chooses with transformed option prices: option ``k`` of layer ``l``
    is priced ``n·T(C_lk / n)`` for its ``n`` channels (:func:`hwsplit.splitting.knapsack.price_transform` of its
    mean cost per channel, ``reference`` the cost of one MAC-equivalent), and the largest budget in those
    units whose plan's real cost (``increase``, else Σ option costs) fits ``budget`` is searched
    (:func:`hwsplit.splitting.knapsack.search_price_budget`);
    blocks over the budget are then dropped by least Σλ per unit of price. ``lp_threshold`` is the
    authors' rounding (:func:`solve_grouped_knapsack`); ``cost_used`` is always in the real unit.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"channel_multiple: expected a positive integer, got {multiple!r}")
    layers = []
    for name, s in scores.items():
        cap = caps.get(name) if isinstance(caps, Mapping) else caps
        layers.append(block_options(name, getattr(s, "eigenvalues", s), multiple, cap))
    option_costs(model, groups, layers, total, current)
    values = [lb.values for lb in layers]
    costs = [np.asarray(lb.costs, dtype=np.float64) for lb in layers]
    if price == "linear":
        prices = [lb.costs for lb in layers]
        choice, lp_bound = solve_grouped_knapsack(values, costs, budget, method=method, lp_threshold=lp_threshold)
    else:
        counts = [np.asarray(lb.counts, dtype=np.float64) for lb in layers]
        prices = [n * price_transform(c / n, price, reference) if n.size else c for n, c in zip(counts, costs)]
        solved: dict[float, tuple[list[int], float | None]] = {}

        def solve(price_budget: float) -> list[int]:
            solved[price_budget] = solve_grouped_knapsack(values, prices, price_budget, method=method,
                                                          lp_threshold=lp_threshold)
            return solved[price_budget][0]

        high = float(sum(max(0.0, float(p.max())) for p in prices if p.size))  # every layer's largest option
        def real(ch: list[int]) -> float:  # measured, cross terms included, when the caller can
            return float(increase(_plan(layers, ch))) if increase is not None and any(ch) else _used(ch, costs)

        choice = search_price_budget(solve, real, budget, high)
        lp_bound = next((b for ch, b in solved.values() if ch == choice), None)
    rounds = 0
    while increase is not None and any(choice) and rounds < max_rounds:
        over = increase(_plan(layers, choice)) - budget
        if over <= 1e-9 * max(1.0, abs(budget)):
            break
        worst, worst_key = None, None
        for li, k in enumerate(choice):
            if not k:
                continue
            lb, pr = layers[li], prices[li]
            dv = lb.values[k - 1] - (lb.values[k - 2] if k > 1 else 0.0)
            dc = pr[k - 1] - (pr[k - 2] if k > 1 else 0.0)
            key = dv / dc if dc > 0 else -math.inf  # least negative per cost goes first
            if worst_key is None or key > worst_key:
                worst, worst_key = li, key
        choice[worst] -= 1
        rounds += 1
        log.info("dropped a block of %d channels of %s: the plan exceeded the budget by %.4g", multiple,
                 layers[worst].name, over)
    plan = _plan(layers, choice)
    info = {"multiple": multiple, "counts": {n: int(t.numel()) for n, t in plan.items()},
            "objective": _objective(choice, [np.asarray(lb.values) for lb in layers]),
            "cost_used": _used(choice, [np.asarray(lb.costs) for lb in layers]), "lp_bound": lp_bound}
    log.info("blocks of %d: %d channels in %d layers, Σλ %.4g, Σ option costs %.4g of budget %.4g", multiple,
             sum(info["counts"].values()), len(plan), info["objective"], info["cost_used"], budget)
    return plan, info


__all__ = ["GROUPED_METHODS", "LayerBlocks", "block_options", "brute_force_grouped",
           "option_costs", "select_blocks", "solve_grouped_knapsack"]
