"""The budgeted knapsack that chooses which neurons to split, on arrays (docs/design.md §3).

Item ``i`` has a splitting index (minimum eigenvalue) ``λ_i < 0`` and a marginal cost ``c_i > 0`` (the cost
of the network after splitting ``i`` minus before, under the chosen cost model). :func:`solve_knapsack`
solves::

    minimise Σ β_i λ_i   subject to   Σ β_i c_i ≤ B,   Σ_{i ∈ layer l} β_i ≤ cap_l,   β_i ∈ {0, 1}

with one of three methods:

``"lp"``
    LP relaxation (``0 ≤ β_i ≤ 1``, scipy ``linprog`` / HiGHS) followed by rounding: items with
    ``β_i = 1`` are kept, then the remaining candidates, fractional ones first, are added greedily by
    ratio ``λ_i / c_i`` (most negative per unit cost first) while budget and caps allow. The answer
    is never worse than the plain ratio greedy nor than the best single item, is always feasible, and
    the LP optimum is a lower bound on the true optimum (reported as ``lp_bound``).
``"milp"``
    Exact 0/1 solution with scipy ``milp`` (HiGHS branch and bound, relative gap 0).
``"greedy"``
    Ratio greedy alone: a baseline.

*Vanilla splitting* (Liu et al., 2019: split the neurons with the most negative indices, a fixed
number of them) is the same problem with every ``c_i = 1``: pass ``costs = 1`` and the number of
neurons to split as the budget.

**Price transforms** (``grow --price``, the authors' recipe). The knapsack may *choose* with a
transformed price ``p_i = T(c_i)`` (:func:`price_transform`: ``linear``, ``sqrt``, ``log``) while the
budget still limits the *real* cost ``Σ c_i``: :func:`search_price_budget` finds the largest budget in
price units whose plan fits the real budget.

Pure: numpy and scipy only. Named neuron groups, caps per group and the strategies by name are
:mod:`hwsplit.splitting.select`.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

log = logging.getLogger(__name__)

METHODS = ("lp", "milp", "greedy")
#: How a neuron's marginal cost is turned into the price the knapsack chooses with (price_transform).
PRICES = ("linear", "sqrt", "log")

# Relative slack allowed on the budget when checking a selection, so that sums such as
# 0.1 + 0.2 against a budget of 0.3 are not rejected over the last bit of a float.
_BUDGET_RTOL = 1e-9
# An LP variable within this distance of 1 counts as chosen, within this of 0 as not.
_LP_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# Pure numpy solver
# --------------------------------------------------------------------------------------------

def budget_limit(budget: float) -> float:
    return budget + _BUDGET_RTOL * max(1.0, abs(budget))


def _ratio_order(values: np.ndarray, costs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``idx`` sorted by ``values / costs`` ascending (best first), ties by more negative value."""
    ratio = values[idx] / costs[idx]
    return idx[np.lexsort((values[idx], ratio))]


def _greedy_fill(
    mask: np.ndarray,
    order: np.ndarray,
    costs: np.ndarray,
    limit: float,
    layer_of: np.ndarray,
    caps: np.ndarray,
) -> np.ndarray:
    """Add the items of ``order`` to ``mask`` one by one when they fit budget and layer caps."""
    mask = mask.copy()
    used = float(costs[mask].sum())
    counts = np.bincount(layer_of[mask], minlength=len(caps)).astype(np.float64)
    for i in order.tolist():
        if mask[i]:
            continue
        layer = layer_of[i]
        if used + costs[i] <= limit and counts[layer] + 1 <= caps[layer]:
            mask[i] = True
            used += costs[i]
            counts[layer] += 1
    return mask


def _repair(
    mask: np.ndarray, values: np.ndarray, costs: np.ndarray, limit: float,
    layer_of: np.ndarray, caps: np.ndarray,
) -> np.ndarray:
    """Drop chosen items, worst ratio first, until budget and caps hold (guards solver tolerances)."""
    mask = mask.copy()
    chosen = _ratio_order(values, costs, np.flatnonzero(mask))[::-1]
    counts = np.bincount(layer_of[mask], minlength=len(caps))
    for i in chosen.tolist():  # layer caps first
        if counts[layer_of[i]] > caps[layer_of[i]]:
            mask[i] = False
            counts[layer_of[i]] -= 1
    used = float(costs[mask].sum())
    for i in chosen.tolist():
        if used <= limit:
            break
        if mask[i]:
            mask[i] = False
            used = float(costs[mask].sum())
    return mask


def _objective(mask: np.ndarray, values: np.ndarray) -> float:
    return float(values[mask].sum())


def _time_limit(time_limit_s: float | None) -> dict[str, float]:
    return {} if time_limit_s is None else {"time_limit": float(time_limit_s)}


def _constraint_rows(
    costs: np.ndarray, layer_of: np.ndarray, caps: np.ndarray, budget: float
) -> tuple[sp.csr_array, np.ndarray]:
    """``A x <= b`` over the given items: the budget row, then one row per layer whose cap binds."""
    m = costs.size
    layers, local_layer = np.unique(layer_of, return_inverse=True)
    per_layer = np.bincount(local_layer, minlength=layers.size)
    binding = np.flatnonzero(caps[layers] < per_layer)
    row_of_layer = np.full(layers.size, -1, dtype=np.int64)
    row_of_layer[binding] = np.arange(1, binding.size + 1)
    in_capped = np.flatnonzero(row_of_layer[local_layer] >= 0)
    A = sp.csr_array(
        (np.concatenate([costs, np.ones(in_capped.size)]),
         (np.concatenate([np.zeros(m, dtype=np.int64), row_of_layer[local_layer][in_capped]]),
          np.concatenate([np.arange(m), in_capped]))),
        shape=(1 + binding.size, m),
    )
    return A, np.concatenate([[budget], caps[layers[binding]]])


def _solve_milp(
    values: np.ndarray,
    costs: np.ndarray,
    budget: float,
    cand: np.ndarray,
    layer_of: np.ndarray,
    caps: np.ndarray,
    time_limit_s: float | None,
    fallback: np.ndarray,
) -> np.ndarray:
    """Exact 0/1 solve with HiGHS.

    Candidates of one layer with the same cost form a *class*; some optimal solution takes a
    prefix of each class sorted by value, so ``x_next <= x_prev`` is added along each class. These
    symmetry-breaking rows prune branch and bound when whole layers share one marginal cost (the usual
    case), and are absent when every cost differs."""
    limit = budget_limit(budget)
    order = cand[np.lexsort((values[cand], costs[cand], layer_of[cand]))]
    m = order.size
    lay, cst = layer_of[order], costs[order]

    ub, b = _constraint_rows(cst, lay, caps, budget)
    constraints = [LinearConstraint(ub, -np.inf, b)]

    prev = np.flatnonzero((lay[1:] == lay[:-1]) & (cst[1:] == cst[:-1]))  # item prev+1 follows prev
    if prev.size:
        rows = np.arange(prev.size)
        chain = sp.csr_array(
            (np.concatenate([np.ones(prev.size), -np.ones(prev.size)]),
             (np.concatenate([rows, rows]), np.concatenate([prev + 1, prev]))),
            shape=(prev.size, m),
        )
        constraints.append(LinearConstraint(chain, -np.inf, 0.0))

    res = milp(
        values[order], constraints=constraints, integrality=np.ones(m), bounds=Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0, **_time_limit(time_limit_s)},
    )
    if res.x is None:
        log.warning("milp found no solution (%s); using the ratio greedy", res.message)
        return fallback
    mask = np.zeros(values.shape[0], dtype=bool)
    mask[order[res.x > 0.5]] = True
    fixed = _repair(mask, values, costs, limit, layer_of, caps)
    if not np.array_equal(fixed, mask):
        log.debug("milp answer violated a constraint by solver tolerance; repaired")
    if res.status != 0:
        log.warning("milp stopped early (%s); the selection may not be optimal", res.message)
        return min((fixed, fallback), key=lambda msk: _objective(msk, values))
    return fixed


def solve_knapsack_bound(
    values: np.ndarray,
    costs: np.ndarray,
    budget: float,
    *,
    layer_of: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    method: str = "lp",
    time_limit_s: float | None = None,
    lp_threshold: float | None = None,
) -> tuple[np.ndarray, float | None]:
    """:func:`solve_knapsack` (same arguments) with the LP bound: the mask and, for ``method="lp"``, the LP
    relaxation optimum, a lower bound on ``Σ values`` of any feasible choice (None for the other methods and
    when no LP was solved).

    ``lp_threshold`` β (lp only): keep exactly the items whose LP value is ``>= β`` (the authors'
    rule, β = 0.99), without the greedy fill and best-of rounding; ``None``: the default rounding."""
    lp_threshold = _check_threshold(lp_threshold)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if costs.shape != values.shape:
        raise ValueError(f"costs must have the shape of values {values.shape}, got {costs.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    if not np.all(np.isfinite(costs)) or np.any(costs <= 0):
        raise ValueError("costs must be finite and > 0")
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget must not be NaN")

    n = values.shape[0]
    if layer_of is None:
        if caps is not None:
            raise ValueError("caps needs layer_of (the layer index of each item)")
        layer_of = np.zeros(n, dtype=np.int64)
        caps = np.array([np.inf])
    else:
        layer_of = np.asarray(layer_of)
        if layer_of.shape != values.shape:
            raise ValueError(f"layer_of must have the shape of values {values.shape}, got {layer_of.shape}")
        if n and (not np.issubdtype(layer_of.dtype, np.integer) or layer_of.min() < 0):
            raise ValueError("layer_of must hold non-negative integers")
        layer_of = layer_of.astype(np.int64)
        n_layers = int(layer_of.max()) + 1 if n else 0
        if caps is None:
            caps = np.full(n_layers, np.inf)
        else:
            caps = np.asarray(caps, dtype=np.float64)
            if caps.ndim != 1 or caps.shape[0] < n_layers:
                raise ValueError(f"caps must be 1-D with at least {n_layers} entries (one per layer)")
            if np.any(np.isnan(caps)) or np.any(caps < 0):
                raise ValueError("caps must be >= 0 (inf for no cap)")
            caps = np.floor(caps + 1e-9)

    mask = np.zeros(n, dtype=bool)
    if budget <= 0:
        log.info("budget %g <= 0: nothing selected", budget)
        return mask, None
    limit = budget_limit(budget)

    cand = np.flatnonzero((values < 0) & (costs <= limit) & (caps[layer_of] >= 1))
    if cand.size == 0:
        if not np.any(values < 0):
            log.info("no negative splitting index among %d items: nothing selected", n)
        else:
            log.info("no candidate fits budget %g and the caps: nothing selected", budget)
        return mask, None

    # Best per layer ignoring the budget (the optimum whenever it fits, e.g. budget = inf).
    by_value = cand[np.argsort(values[cand], kind="stable")]
    unbounded = _greedy_fill(mask, by_value, np.zeros(n), np.inf, layer_of, caps)
    if float(costs[unbounded].sum()) <= limit:
        log.debug("budget %g not binding: all %d capped candidates selected", budget, int(unbounded.sum()))
        return unbounded, (_objective(unbounded, values) if method == "lp" else None)

    greedy = _greedy_fill(mask, _ratio_order(values, costs, cand), costs, limit, layer_of, caps)
    if method == "greedy":
        return greedy, None

    if method == "milp":
        return _solve_milp(values, costs, budget, cand, layer_of, caps, time_limit_s, greedy), None

    m = cand.size
    A, b = _constraint_rows(costs[cand], layer_of[cand], caps, budget)
    c = values[cand]

    res = linprog(c, A_ub=A, b_ub=b, bounds=(0, 1), method="highs", options=_time_limit(time_limit_s))
    if res.status != 0 or res.x is None:  # includes running out of time: no bound to round
        log.warning("linprog failed (%s); falling back to the ratio greedy", res.message)
        return greedy, None
    x = res.x
    if lp_threshold is not None:  # the authors' rule: β_i >= threshold, nothing else
        mask[cand[x >= lp_threshold - _LP_TOL]] = True
        return _repair(mask, values, costs, limit, layer_of, caps), float(res.fun)
    mask[cand[x >= 1 - _LP_TOL]] = True
    mask = _repair(mask, values, costs, limit, layer_of, caps)
    frac = cand[(x > _LP_TOL) & (x < 1 - _LP_TOL)]
    rest = cand[x <= _LP_TOL]
    order = np.concatenate([_ratio_order(values, costs, frac), _ratio_order(values, costs, rest)])
    rounded = _greedy_fill(mask, order, costs, limit, layer_of, caps)

    best_single = np.zeros(n, dtype=bool)
    best_single[cand[np.argmin(values[cand])]] = True
    best = min((rounded, greedy, best_single), key=lambda msk: _objective(msk, values))
    log.debug(
        "lp: %d candidates, %d rows, lp bound %.6g, rounded %.6g (greedy %.6g)",
        m, A.shape[0], res.fun, _objective(rounded, values), _objective(greedy, values),
    )
    return best, float(res.fun)


def solve_knapsack(
    values: np.ndarray,
    costs: np.ndarray,
    budget: float,
    *,
    layer_of: np.ndarray | None = None,
    caps: np.ndarray | None = None,
    method: str = "lp",
    time_limit_s: float | None = None,
    lp_threshold: float | None = None,
) -> np.ndarray:
    """Choose items minimising ``Σ values`` under a cost budget and per-layer count caps.

    Args:
        values: shape ``(n,)``, the splitting indices λ (negative = worth splitting). Items with
            ``value >= 0`` are never chosen.
        costs: shape ``(n,)``, marginal cost of each item, finite and ``> 0``. Vanilla splitting
            (2019) is ``costs = 1`` with the number of neurons as the budget.
        budget: total cost allowed; ``inf`` means only the caps limit; ``<= 0`` selects nothing.
        layer_of: shape ``(n,)``, non-negative integer layer of each item (``None``: one layer).
        caps: per layer (indexed by ``layer_of``) the most items to choose; ``inf`` for no cap.
        method: ``"lp"`` (LP relaxation + rounding), ``"milp"`` (exact) or ``"greedy"`` (ratio).
        time_limit_s: wall-clock limit for the HiGHS solve (None: none). A MILP stopped early
            returns the better of its best solution and the ratio greedy, with a warning.
        lp_threshold: ``method="lp"`` only: keep the items whose LP value β_i is at least this (in
            (0, 1]; the authors' β ≥ 0.99) and nothing else; None: the default rounding (β_i = 1
            kept, then the fractional and other candidates added by ratio while they fit).

    Returns:
        boolean mask of shape ``(n,)``; always satisfies budget and caps.

    Raises:
        ValueError: unknown ``method``, mismatched shapes, non-finite values, costs that are not
            finite and positive, NaN budget, ``caps`` without ``layer_of``.
    """
    return solve_knapsack_bound(values, costs, budget, layer_of=layer_of, caps=caps, method=method,
                                time_limit_s=time_limit_s, lp_threshold=lp_threshold)[0]



# --------------------------------------------------------------------------------------------
# Price transforms: the price chooses, the real cost limits
# --------------------------------------------------------------------------------------------

def _check_threshold(lp_threshold: float | None) -> float | None:
    if lp_threshold is None:
        return None
    if isinstance(lp_threshold, bool) or not isinstance(lp_threshold, numbers.Real) or not 0 < lp_threshold <= 1:
        raise ValueError(f"lp_threshold: expected a number in (0, 1] or None, got {lp_threshold!r}")
    return float(lp_threshold)


def price_transform(costs: Any, price: str, reference: float = 1.0) -> np.ndarray:
    """The price the knapsack chooses with, from real marginal costs ``costs`` (any shape, any sign).

    With ``x = c / reference`` (``reference``: the cost of one MAC-equivalent, 1 for MACs):
    ``linear`` → ``c`` itself; ``sqrt`` → ``√x`` (the authors' CIFAR price, ``np.sqrt(flops_inc)``);
    ``log`` → ``log(1 + x)``, the authors' ImageNet price ``log(ΔMACs)`` made well defined and
    positive for ``x < 1`` (it differs from ``log x`` by under ``1/x``, so by less than 0.01 for any
    neuron that adds 100 MACs or more). A negative cost (a block of channels that makes a table-priced
    layer cheaper) keeps its sign: ``T(c) = sign(c)·T(|c|)``. Only the ratios of prices matter to the
    choice: ``sqrt`` is the same whatever the ``reference``, ``log`` is not (so other units are first
    converted to MAC-equivalents by the caller's ``reference``). ``ValueError`` names ``price`` when
    unknown and ``reference`` when it is not finite and positive.
    """
    if price not in PRICES:
        raise ValueError(f"price: expected one of {', '.join(PRICES)}, got {price!r}")
    if not (isinstance(reference, numbers.Real) and math.isfinite(reference) and reference > 0):
        raise ValueError(f"reference: expected a finite positive cost of one MAC-equivalent, got {reference!r}")
    c = np.asarray(costs, dtype=np.float64)
    if price == "linear":
        return c.copy()
    x = np.abs(c) / float(reference)
    return np.sign(c) * (np.sqrt(x) if price == "sqrt" else np.log1p(x))


def search_price_budget(solve: Any, real_cost: Any, budget: float, high: float, *,
                        rtol: float = 1e-3, max_solves: int = 40) -> Any:
    """The plan of the largest price budget (in ``[0, high]``) whose real cost fits ``budget``.

    ``solve(price_budget)`` returns a plan chosen by the knapsack with transformed prices;
    ``real_cost(plan)`` is that plan's cost in the real unit (MACs, ms, mJ). ``high`` is the price of
    everything that could be chosen: its plan is returned at once when it fits. Otherwise bisection
    down to ``rtol`` of ``high`` (at most ``max_solves`` solves): the returned plan is the one of the
    largest price budget tried whose real cost was ``<= budget`` (the empty plan of budget 0 at worst),
    so the real budget is never exceeded, whatever the prices.
    """
    limit = budget_limit(budget)
    if not (budget > 0 and high > 0):
        return solve(0.0)
    plan = solve(high)
    if real_cost(plan) <= limit:
        return plan
    lo, hi, best = 0.0, float(high), solve(0.0)
    for _ in range(max_solves):
        if hi - lo <= rtol * high:
            break
        mid = 0.5 * (lo + hi)
        plan = solve(mid)
        if real_cost(plan) <= limit:
            lo, best = mid, plan
        else:
            hi = mid
    return best
