"""Which neurons to split: the knapsack over named neuron groups, and the strategies by name (docs/design.md §3).

:func:`select_neurons` (and :func:`select_neurons_report`) turn each group's splitting indices (minimum
eigenvalues, negative = worth splitting), its marginal costs and its cap into one knapsack
(:func:`hwsplit.splitting.knapsack.solve_knapsack`) and return, per group, the neurons to split.
:func:`knapsack_cut` gives, per group, the index below which a neuron would be chosen.

``"random"`` (:func:`random_selection`)
    The baseline that tells how much the indices matter: neurons drawn uniformly at random among
    *all* neurons of the scored groups, under the same budget and caps.

:data:`SELECTIONS` dispatches every strategy (``lp``, ``milp``, ``greedy``, ``random``) by name with one
signature (:func:`select_by_name`).

:func:`fit_plan_to_budget` drops the least valuable chosen neurons until a plan's real cost increase fits.

numpy and scipy only at import: :func:`select_neurons`, :func:`random_selection` and :func:`fit_plan_to_budget`
import torch inside the function to build their ``LongTensor`` results.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hwsplit.splitting.knapsack import METHODS, budget_limit, solve_knapsack_bound

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Selection over named neuron groups
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionInfo:
    """What :func:`select_neurons_report` chose, in numbers.

    ``objective`` is ``Σ λ`` over the chosen neurons (more negative is better); ``lp_bound`` is the
    LP relaxation optimum (a lower bound on any feasible objective) for ``method="lp"``, else None.
    ``cost_used`` and ``budget`` are in the unit of the costs passed in.
    """

    method: str
    budget: float
    cost_used: float
    objective: float
    n_candidates: int
    n_selected: int
    counts: dict[str, int] = field(default_factory=dict)
    lp_bound: float | None = None


def _eigenvalues(name: str, score: Any) -> np.ndarray:
    ev = getattr(score, "eigenvalues", score)
    if hasattr(ev, "detach"):  # a torch Tensor, without importing torch here
        ev = ev.detach().cpu().double().numpy()
    arr = np.asarray(ev, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"eigenvalues of group {name!r} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"eigenvalues of group {name!r} are not all finite")
    return arr


def _group_costs(name: str, cost: Any, n: int) -> np.ndarray:
    if isinstance(cost, numbers.Real) and not isinstance(cost, bool):
        arr = np.full(n, float(cost))
    else:
        if hasattr(cost, "detach"):
            cost = cost.detach().cpu().double().numpy()
        try:
            arr = np.asarray(cost, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cost of group {name!r} is not a number or a sequence of numbers") from exc
        if arr.ndim == 0:
            arr = np.full(n, float(arr))
        elif arr.shape != (n,):
            raise ValueError(f"costs of group {name!r} must be a number or have {n} entries, got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"costs of group {name!r} must be finite and > 0")
    return arr


def cap_value(where: str, cap: Any, width: int) -> float:
    """The most neurons a group of ``width`` channels may give: the one cap rule of every strategy."""
    if cap is None:
        return math.inf
    bad = f"caps{where} must be an int, a fraction in (0, 1] or None, got {cap!r}"
    if isinstance(cap, bool):  # ValueError like every other bad argument here
        raise ValueError(bad)  # noqa: TRY004
    if isinstance(cap, numbers.Integral):
        if cap < 0:
            raise ValueError(f"caps{where} must be >= 0, got {cap}")
        return float(cap)
    if isinstance(cap, numbers.Real):
        if not 0.0 < cap <= 1.0:
            raise ValueError(f"caps{where} as a float is a fraction of the width in (0, 1], got {cap}")
        return float(max(1, math.floor(cap * width)))
    raise ValueError(bad)


def knapsack_cut(
    scores: Mapping[str, Any],
    costs: Mapping[str, float | Sequence[float]],
    budget: float,
    *,
    caps: float | Mapping[str, float | None] | None = None,
) -> dict[str, np.ndarray]:
    """Per neuron, the splitting index t_i below which the knapsack's LP relaxation takes it (units of λ).

    With one budget row the relaxation is the fractional knapsack: it takes the candidates (λ < 0, cost
    within the budget) in order of λ_i/c_i, most negative first, until the budget runs out; the item it
    takes in part has ratio r*, the budget's price (r* = 0 when every candidate fits). A layer cap that
    binds adds its own price r_l, the midpoint of the ratios of the layer's last taken and first left
    candidate. Neuron i is taken iff λ_i < t_i = c_i · min(r*, r_l) (≤ 0). The rounding of ``lp`` and
    ``milp``'s exact answer differ from this only near t, which is why adaptive scoring decides each
    neuron's side of t by its error bar (hwsplit.splitting.ritz.AdaptiveScoring).
    """
    names = list(scores)
    vals = {name: _eigenvalues(name, scores[name]) for name in names}
    cost = {name: _group_costs(name, costs[name], vals[name].shape[0]) for name in names}
    limit = budget_limit(float(budget))
    layer_price: dict[str, float] = {}
    taken: list[tuple[float, float]] = []  # (ratio, cost) of the candidates within their layer's cap
    for name in names:
        ev, c = vals[name], cost[name]
        if isinstance(caps, Mapping):
            cap = cap_value(f"[{name!r}]", caps.get(name), ev.shape[0])
        else:
            cap = cap_value("", caps, ev.shape[0])
        cand = np.flatnonzero((ev < 0) & (c <= limit))
        ratio = np.sort(ev[cand] / c[cand])
        keep = int(min(cap, ratio.size))
        if keep < ratio.size:  # the cap binds: its price lies between the last kept and the first left
            layer_price[name] = 0.5 * (ratio[keep - 1] + ratio[keep]) if keep else -math.inf
        order = np.argsort(ev[cand] / c[cand], kind="stable")[:keep]
        taken.extend(zip((ev[cand] / c[cand])[order].tolist(), c[cand][order].tolist()))
    price = 0.0
    used = 0.0
    for ratio_i, cost_i in sorted(taken):
        used += cost_i
        if used > limit:
            price = ratio_i
            break
    return {name: cost[name] * min(price, layer_price.get(name, 0.0)) for name in names}


def select_neurons_report(
    scores: Mapping[str, Any],
    costs: Mapping[str, float | Sequence[float]],
    budget: float,
    *,
    caps: float | Mapping[str, float | None] | None = None,
    method: str = "lp",
    threshold: float = 0.0,
    time_limit_s: float | None = None,
    lp_threshold: float | None = None,
) -> tuple[dict[str, torch.Tensor], SelectionInfo]:
    """:func:`select_neurons`, and a :class:`SelectionInfo` describing the choice."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    threshold = float(threshold)
    if not threshold <= 0:
        raise ValueError(f"threshold must be <= 0, got {threshold}")
    if isinstance(caps, Mapping):
        unknown = sorted(set(caps) - set(scores))
        if unknown:
            log.warning("caps name groups that have no scores (ignored): %s", unknown)

    names = list(scores)
    values, cost_parts, layer_parts, cap_list, offsets = [], [], [], [], [0]
    for layer, name in enumerate(names):
        ev = _eigenvalues(name, scores[name])
        if name not in costs:
            raise ValueError(f"no cost given for group {name!r}")
        cost = _group_costs(name, costs[name], ev.shape[0])
        if isinstance(caps, Mapping):
            cap = cap_value(f"[{name!r}]", caps.get(name), ev.shape[0])
        else:
            cap = cap_value("", caps, ev.shape[0])
        # Non-candidates (λ >= threshold) become value 0: never chosen by the solver.
        values.append(np.where(ev < threshold, ev, 0.0))
        cost_parts.append(cost)
        layer_parts.append(np.full(ev.shape[0], layer, dtype=np.int64))
        cap_list.append(cap)
        offsets.append(offsets[-1] + ev.shape[0])

    v = np.concatenate(values) if values else np.zeros(0)
    c = np.concatenate(cost_parts) if cost_parts else np.zeros(0)
    layer_of = np.concatenate(layer_parts) if layer_parts else np.zeros(0, dtype=np.int64)
    mask, lp_bound = solve_knapsack_bound(v, c, budget, layer_of=layer_of, caps=np.asarray(cap_list, dtype=np.float64),
                                          method=method, time_limit_s=time_limit_s, lp_threshold=lp_threshold)

    import torch  # lazily: the solver above is pure numpy

    plan: dict[str, torch.Tensor] = {}
    for layer, name in enumerate(names):
        idx = np.flatnonzero(mask[offsets[layer]:offsets[layer + 1]])
        if idx.size:
            plan[name] = torch.as_tensor(idx, dtype=torch.long)
    info = SelectionInfo(
        method=method,
        budget=float(budget),
        cost_used=float(c[mask].sum()),
        objective=float(v[mask].sum()),
        n_candidates=int(np.count_nonzero(v < 0)),
        n_selected=int(mask.sum()),
        counts={name: int(t.numel()) for name, t in plan.items()},
        lp_bound=lp_bound,
    )
    log.info(
        "selected %d of %d candidate neurons in %d groups (%s): cost %.6g of budget %.6g, Σλ = %.6g",
        info.n_selected, info.n_candidates, len(plan), method, info.cost_used, info.budget, info.objective,
    )
    return plan, info


def select_neurons(
    scores: Mapping[str, Any],
    costs: Mapping[str, float | Sequence[float]],
    budget: float,
    *,
    caps: float | Mapping[str, float | None] | None = None,
    method: str = "lp",
    threshold: float = 0.0,
    time_limit_s: float | None = None,
    lp_threshold: float | None = None,
) -> dict[str, torch.Tensor]:
    """Choose the neurons to split: ``{group name: sorted LongTensor of channel indices}``.

    Args:
        scores: per group, an object with ``.eigenvalues`` (Tensor or array of shape ``(n,)``) or
            the eigenvalues themselves; channel ``j`` is position ``j``.
        costs: per group, the marginal cost of splitting ONE more neuron of it (a number), or one
            number per neuron. Every group in ``scores`` needs one, finite and ``> 0``. Vanilla
            splitting (2019) is every cost ``1.0`` with the neuron count as the budget.
        budget: total marginal cost allowed (same unit as the costs); ``inf`` = caps only;
            ``<= 0`` selects nothing.
        caps: most splits per group: an int for every group, a float in (0, 1] for that fraction
            of each group's width (floor, at least 1), a mapping per group name (missing or None =
            no cap), or None for no caps.
        method: ``"lp"`` (default), ``"milp"`` (exact) or ``"greedy"``; see the module docstring.
        threshold: only neurons with ``λ < threshold`` (``threshold <= 0``) are candidates.
        time_limit_s: wall-clock limit for the solver (None: none); see
            :func:`hwsplit.splitting.knapsack.solve_knapsack`.
        lp_threshold: the authors' rounding of the LP (``method="lp"``); see
            :func:`hwsplit.splitting.knapsack.solve_knapsack`.

    Returns:
        only groups with at least one chosen neuron; ``{}`` when nothing is worth splitting or
        nothing fits the budget (logged at INFO, never an error).

    Raises:
        ValueError: unknown ``method``; a group without a cost, or with a cost that is not finite
            and positive, or with the wrong number of per-neuron costs; non-finite eigenvalues;
            invalid caps or threshold; NaN budget.
    """
    return select_neurons_report(
        scores, costs, budget, caps=caps, method=method, threshold=threshold,
        time_limit_s=time_limit_s, lp_threshold=lp_threshold,
    )[0]


# --------------------------------------------------------------------------------------------
# The random baseline, and every strategy by name
# --------------------------------------------------------------------------------------------

def random_selection(widths: Mapping[str, int], costs: Mapping[str, float], budget: float, *,
                     caps: float | Mapping[str, float | None] | None = None,
                     seed: int | Sequence[int] = 0) -> dict[str, torch.Tensor]:
    """Neurons chosen uniformly at random under a budget: ``{group: sorted LongTensor of channels}``.

    Every neuron ``j < widths[name]`` of every group is a candidate, whatever its splitting index.
    They are visited in one uniformly random order (``numpy.random.default_rng(seed)``) and each is
    taken when its marginal cost ``costs[name]`` still fits the remaining ``budget`` and its group's
    cap (the same rule as :func:`select_neurons`). Deterministic for a given ``seed``. Groups with
    no chosen neuron are left out; ``{}`` when nothing fits. ``ValueError`` names a missing or
    non-positive cost or a negative width.
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
    limit = budget_limit(budget)
    caps_left = [cap_value(f"[{n!r}]", caps.get(n) if isinstance(caps, Mapping) else caps, widths[n])
                 for n in names]
    cost = [float(costs[n]) for n in names]
    used = 0.0
    chosen: dict[str, list[int]] = {}
    for k in order:
        g = int(group_of[k])
        if caps_left[g] <= 0 or used + cost[g] > limit:
            continue
        used += cost[g]
        caps_left[g] -= 1
        chosen.setdefault(names[g], []).append(int(channel[k]))
    log.info("random selection: %d neurons, %.4g of budget %.4g", sum(map(len, chosen.values())), used, budget)
    return {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in chosen.items()}


def fit_plan_to_budget(plan: dict[str, torch.Tensor], scores: Mapping[str, Any], marginal: Mapping[str, float],
                       increase: Callable[[dict[str, torch.Tensor]], float], budget: float,
                       *, max_rounds: int = 20, rank: Callable[[str, int], float] | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Drop the least valuable chosen neurons until the *actual* cost increase fits the budget.

    The knapsack prices neurons one at a time; splitting neighbouring layers together also adds
    their cross terms (a conv grows in both its input and its output channels), so the real
    increase can exceed the sum of marginals by a few percent. ``increase(plan)`` measures it on
    the architecture the plan would produce; neurons with the worst λ/cost ratio go first, or
    those with the highest ``rank(group, channel)`` when given (the random baseline). Each of the
    first ``max_rounds`` rounds drops neurons worth the excess in marginals, later rounds one neuron
    each; the plan returned is always one whose increase was measured to fit (or the empty plan).
    """
    import torch  # lazily, as below

    def value(k: str, j: int) -> float:
        return rank(k, j) if rank is not None else float(scores[k].eigenvalues[j]) / marginal[k]

    items = sorted(((value(k, int(j)), k, int(j)) for k, v in plan.items() for j in v),
                   reverse=True)  # worst (least negative per cost) first
    rounds = 0
    while True:
        over = increase(plan) - budget
        if over <= 1e-9 * max(1.0, abs(budget)) or not items:
            return plan
        drop, freed = [], 0.0
        while items and (not drop or (freed < over and rounds < max_rounds)):
            _, k, j = items.pop(0)
            drop.append((k, j))
            freed += marginal[k]
        dropped: dict[str, set[int]] = {}
        for k, j in drop:
            dropped.setdefault(k, set()).add(j)
        plan = {k: torch.tensor([j for j in v.tolist() if j not in dropped.get(k, ())], dtype=torch.long)
                for k, v in plan.items()}
        plan = {k: v for k, v in plan.items() if v.numel()}
        log.info("dropped %d neurons whose joint cost exceeded the budget by %.4g", len(drop), over)
        rounds += 1


def _knapsack_strategy(method: str):
    def strategy(scores, costs, budget, *, caps=None, seed=0, lp_threshold=None):
        return select_neurons(scores, costs, budget, caps=caps, method=method,
                              lp_threshold=lp_threshold if method == "lp" else None)
    strategy.__doc__ = (f"The {method!r} knapsack (:func:`select_neurons`); ``seed`` is unused"
                        + ("." if method == "lp" else ", and so is ``lp_threshold``."))
    return strategy


def _random_strategy(scores, costs, budget, *, caps=None, seed=0, lp_threshold=None):
    """:func:`random_selection` over every neuron of the scored groups (``lp_threshold`` is unused)."""
    return random_selection({k: len(_eigenvalues(k, s)) for k, s in scores.items()}, costs, budget, caps=caps,
                            seed=seed)


#: Every selection strategy by name: ``strategy(scores, costs, budget, *, caps, seed, lp_threshold) -> plan``.
SELECTIONS = {**{m: _knapsack_strategy(m) for m in METHODS}, "random": _random_strategy}


def select_by_name(name: str, scores: Mapping[str, Any], costs: Mapping[str, float], budget: float, *,
                   caps: float | Mapping[str, float | None] | None = None,
                   seed: int | Sequence[int] = 0, lp_threshold: float | None = None) -> dict[str, torch.Tensor]:
    """Run the strategy ``name`` of :data:`SELECTIONS`; ``ValueError`` naming ``selection`` if unknown.

    ``lp_threshold`` is the authors' rounding of the ``lp`` strategy
    (:func:`hwsplit.splitting.knapsack.solve_knapsack`); the others ignore it."""
    if name not in SELECTIONS:
        raise ValueError(f"selection: expected one of {', '.join(SELECTIONS)}, got {name!r}")
    return SELECTIONS[name](scores, costs, budget, caps=caps, seed=seed, lp_threshold=lp_threshold)
