"""The selection recipe of one stage: price transform, group budgets, per-layer caps and ceilings (docs/design.md §3).

The paper's text prices each neuron by the cost it adds and fills one budget per stage; the authors' code
(dilinwang820/fast-energy-aware-splitting, ``mbv1_cifar100/main_split.py``) grows differently, and
:func:`select_stage` offers each of its elements as a setting (``grow --price``, ``--group-budgets``,
``--max-widths``, ``--lp-threshold``, ``--recipe authors``):

* **price** (:func:`hwsplit.splitting.knapsack.price_transform`): the knapsack chooses with ``T(c)`` of each
  neuron's real marginal cost ``c`` (``sqrt``: the authors' ``np.sqrt(flops_inc)``), while the stage
  budget keeps limiting the real cost (MACs, ms, mJ): the largest budget in price units whose plan's real
  cost, measured on the architecture it produces, fits is searched
  (:func:`hwsplit.splitting.knapsack.search_price_budget`),
  what is left of the real budget is
  filled with the best remaining neurons per unit of price that still fit (not under ``lp_threshold``,
  and not for channel multiples), and the plan is then fitted to the real budget on the real
  architecture, as always;
* **group budgets** (:func:`budget_groups`, :func:`group_shares`): the stage budget B is split over
  groups of layers in proportion to each group's price-weighted width ``w_g = Σ_{l∈g} width_l · p_l``
  (the authors' ``max_resource_per_group``: grow × Σ channels × price over the group's layers), and each
  group is selected and fitted within its own share ``B·w_g/Σw``; the union is fitted to B once more
  (neighbouring layers of two groups add cross terms), so no group spends more than its share and the
  stage never more than B;
* **caps** (:func:`layer_caps`): a layer of width c gains at most c neurons per stage (each neuron splits
  once: the authors' ``min(c, max_c − c)`` first term holds by construction), at most
  ``max_layer_growth``·c, and never grows past its ceiling ``max_c`` (:func:`hwsplit.network.families.width_ceilings`);
* **LP threshold**: the LP's solution kept at ``β ≥ 0.99`` and nothing else (``lp_threshold``).

With the defaults (``linear``, ``none``, no ceiling, no threshold) :func:`select_stage` runs exactly the
selection the stage loop ran before these settings existed. Layer 1: no cost model is imported; the
real cost of a plan comes from the caller's ``increase`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hwsplit.network.families import width_ceilings
from hwsplit.splitting.blocks import select_blocks
from hwsplit.splitting.knapsack import PRICES, budget_limit, price_transform, search_price_budget
from hwsplit.splitting.select import cap_value, fit_plan_to_budget, select_by_name

log = logging.getLogger(__name__)

#: How a stage budget is split over the network (grow --group-budgets): ``none`` one budget;
#: ``authors`` two groups, the layers whose output map is at least half the side of the largest map and
#: the rest (the authors' ``split_groups`` for MobileNetV1: stem and blocks 1–3 | blocks 4–13);
#: ``resolution`` one group per output map size.
GROUP_BUDGETS = ("none", "authors", "resolution")

Plan = dict[str, torch.Tensor]


def output_sides(model: nn.Module, names: Sequence[str], input_shape: tuple[int, ...]) -> dict[str, int]:
    """The side (last dimension) of each named module's output map in one forward pass of a zero input;
    1 for a flat output (a Linear layer). ``input_shape`` includes the batch dimension."""
    modules = dict(model.named_modules())
    sides: dict[str, int] = {}
    handles = []
    for name in names:
        if name not in modules:
            raise ValueError(f"group {name!r}: no module of that name in the model")
        handles.append(modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: sides.__setitem__(name, int(out.shape[-1]) if out.dim() > 2 else 1)))
    param = next(model.parameters(), None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=param.device if param is not None else "cpu",
                              dtype=param.dtype if param is not None else torch.float32))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: sides.get(name, 1) for name in names}


def budget_groups(sides: Mapping[str, int], mode: str) -> dict[str, int]:
    """Group id of each layer (by its output map side) under ``mode`` of :data:`GROUP_BUDGETS`.

    Ids count from 0 at the largest maps. A network whose layers all have one map size (an MLP: every
    side 1) is one group under every mode, so its budget is not split. ``ValueError`` names
    ``group_budgets`` for an unknown mode.
    """
    if mode not in GROUP_BUDGETS:
        raise ValueError(f"group_budgets: expected one of {', '.join(GROUP_BUDGETS)}, got {mode!r}")
    if mode == "none" or not sides:
        return {name: 0 for name in sides}
    if mode == "authors":
        largest = max(sides.values())
        return {name: 0 if 2 * side >= largest else 1 for name, side in sides.items()}
    order = sorted(set(sides.values()), reverse=True)
    return {name: order.index(side) for name, side in sides.items()}


def group_shares(widths: Mapping[str, int], prices: Mapping[str, float], group_of: Mapping[str, int],
                 budget: float) -> dict[int, float]:
    """Each group's share of ``budget``: ``B · w_g / Σ_h w_h`` with ``w_g = Σ_{l∈g} widths_l · prices_l``
    (price per neuron of layer l, > 0). The shares sum to ``budget`` (up to rounding); one group gets it all."""
    weight: dict[int, float] = {}
    for name, g in group_of.items():
        weight[g] = weight.get(g, 0.0) + widths[name] * prices[name]
    total = sum(weight.values())
    if len(weight) <= 1 or not total > 0:
        return {g: float(budget) for g in weight} if len(weight) == 1 else {}
    return {g: float(budget) * w / total for g, w in sorted(weight.items())}


def layer_caps(widths: Mapping[str, int], max_layer_growth: float | None,
               ceilings: Mapping[str, int]) -> dict[str, float | int | None]:
    """The most neurons each layer may gain this stage: ``max_layer_growth`` (a fraction of the width,
    :func:`hwsplit.splitting.select.cap_value`), and never past its ceiling (``max(0, ceiling − width)``, the
    authors' ``max_c − c``). ``None``: no cap beyond one split per neuron (at most doubling)."""
    caps: dict[str, float | int | None] = {}
    for name, width in widths.items():
        cap: float | int | None = max_layer_growth
        if name in ceilings:
            room = max(0, int(ceilings[name]) - int(width))
            cap = room if cap is None else min(room, int(cap_value(f"[{name!r}]", cap, width)))
        caps[name] = cap
    return caps


def _width(score: Any) -> int:
    return int(getattr(score, "eigenvalues", score).numel())


def _eig(score: Any) -> torch.Tensor:
    return getattr(score, "eigenvalues", score)


def _select_neurons(method: str, scores: Mapping[str, Any], marginal: Mapping[str, float],
                    prices: Mapping[str, float] | None, budget: float, *, caps: Any, seed: Any,
                    lp_threshold: float | None, increase: Callable[[Plan], float] | None = None) -> Plan:
    """One knapsack (or the random baseline) over ``scores`` with the real ``budget``; with ``prices``
    (a transform other than linear) the knapsack chooses in price units under the real budget, each
    candidate plan's real cost measured by ``increase`` (cross terms included) when given, else Σ marginals."""
    costs = {k: marginal[k] for k in scores}
    if prices is None or method == "random":  # random draws under the real cost, whatever the price
        return select_by_name(method, scores, costs, budget, caps=caps, seed=seed, lp_threshold=lp_threshold)
    price = {k: prices[k] for k in scores}

    def solve(price_budget: float) -> Plan:
        return select_by_name(method, scores, price, price_budget, caps=caps, seed=seed, lp_threshold=lp_threshold)

    def real(plan: Plan) -> float:
        if increase is not None:
            return float(increase(plan)) if plan else 0.0
        return float(sum(costs[k] * v.numel() for k, v in plan.items()))

    limit: dict[str, float] = {}
    high = 0.0
    for k, s in scores.items():
        cap = caps.get(k) if isinstance(caps, Mapping) else caps
        limit[k] = cap_value(f"[{k!r}]", cap, _width(s))
        high += price[k] * min(int((_eig(s) < 0).sum()), limit[k])
    plan = search_price_budget(solve, real, budget, high)
    if lp_threshold is not None:  # the authors' rule: the LP's β >= threshold and nothing else
        return plan
    # the search stops where one more dear neuron would not fit; cheaper ones may: add them, best λ per
    # unit of price first, while the real budget and the caps allow
    used = real(plan)
    chosen = {k: set(v.tolist()) for k, v in plan.items()}
    order = sorted((float(_eig(s)[j]) / price[k], k, j) for k, s in scores.items()
                   for j in torch.nonzero(_eig(s) < 0).flatten().tolist() if j not in chosen.get(k, ()))
    for _, k, j in order:
        if used + costs[k] <= budget_limit(budget) and len(chosen.get(k, ())) + 1 <= limit[k]:
            chosen.setdefault(k, set()).add(j)
            used += costs[k]
    return {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in chosen.items() if v}


def _drop_blocks(plan: Plan, scores: Mapping[str, Any], prices: Mapping[str, float], multiple: int,
                 increase: Callable[[Plan], float], budget: float, max_rounds: int = 100) -> Plan:
    """Drop whole blocks (a layer's ``multiple`` chosen channels of least negative index) until the plan's
    real increase fits: the block with the least Σλ per unit of price first."""
    plan = {k: v.clone() for k, v in plan.items()}
    for _ in range(max_rounds):
        over = increase(plan) - budget
        if over <= 1e-9 * max(1.0, abs(budget)) or not plan:
            break
        worst, worst_key = None, None
        for k, v in plan.items():
            ev = _eig(scores[k])[v]
            block = torch.argsort(ev, descending=True)[:multiple]  # the least negative chosen channels
            key = float(ev[block].sum()) / (prices[k] * multiple)
            if worst_key is None or key > worst_key:
                worst, worst_key = (k, v[block]), key
        k, block = worst
        keep = plan[k][~torch.isin(plan[k], block)]
        plan = {n: (keep if n == k else v) for n, v in plan.items() if n != k or keep.numel()}
        log.info("dropped a block of %d channels of %s: the groups' union exceeded the budget by %.4g",
                 multiple, k, over)
    return plan


def select_stage(method: str, scores: Mapping[str, Any], marginal: Mapping[str, float], budget: float, *,
                 increase: Callable[[Plan], float], fit: Callable[..., Plan] = fit_plan_to_budget, seed: Any = 0,
                 rank: Callable[[str, int], float] | None = None, max_layer_growth: float | None = None,
                 price: str = "linear", reference: float = 1.0, group_budgets: str = "none",
                 max_widths: str | Sequence[int] | None = None, lp_threshold: float | None = None,
                 family: str | None = None, model: nn.Module | None = None, graph: Any = None,
                 input_shape: tuple[int, ...] | None = None, multiple: int | None = None,
                 total: Callable[[nn.Module], float] | None = None,
                 current: float | None = None) -> tuple[Plan, dict[str, Any]]:
    """Choose the neurons one stage splits; ``(plan, info)``.

    Args:
        method: a strategy of :data:`hwsplit.splitting.select.SELECTIONS` (``lp``, ``milp``, ``greedy``, ``random``).
        scores: per neuron group, its splitting indices (``.eigenvalues``), groups in graph order.
        marginal: per group, the real cost of one more neuron (the cost model's unit, > 0).
        budget: the stage budget in that unit; the plan's real increase never exceeds it.
        increase: ``increase(plan)``, the real cost increase of a plan on the real architecture.
        fit: how a plan is brought under the budget: :func:`hwsplit.splitting.select.fit_plan_to_budget` (drops
            single neurons until ``increase`` fits).
        seed, rank: the random baseline's seed, and its order of dropping (``fit``'s ``rank``).
        max_layer_growth, max_widths, family: per-layer caps (:func:`layer_caps`) and ceilings
            (:func:`hwsplit.network.families.width_ceilings` of ``family``).
        price, reference: the transform the knapsack chooses with and the cost of one MAC-equivalent in
            the cost model's unit (:func:`hwsplit.splitting.knapsack.price_transform`); ``random`` ignores the price.
        group_budgets: a mode of :data:`GROUP_BUDGETS`; groups by output map side (needs ``model``,
            ``input_shape``).
        lp_threshold: the authors' rounding of ``lp`` (:func:`hwsplit.splitting.knapsack.solve_knapsack`).
        model, graph, multiple, total, current: growth in channel multiples
            (:func:`hwsplit.splitting.blocks.select_blocks`) when ``multiple`` is given.

    ``info`` holds ``"blocks"`` (select_blocks' info, ``cost_used`` summed over groups; only with
    ``multiple``) and ``"groups"`` (only with more than one budget group: per group id its ``layers``,
    ``share`` of the budget and the ``used`` real increase of its own plan).
    """
    names = list(scores)
    widths = {k: _width(scores[k]) for k in names}
    caps: Any = max_layer_growth
    ceilings = width_ceilings(family, max_widths, names) if max_widths is not None else {}
    if ceilings:
        caps = layer_caps(widths, max_layer_growth, ceilings)
    if price not in PRICES:
        raise ValueError(f"price: expected one of {', '.join(PRICES)}, got {price!r}")
    prices = None if price == "linear" else {
        k: float(price_transform(marginal[k], price, reference)) for k in names}
    by_price = prices or {k: float(marginal[k]) for k in names}
    if rank is None and prices is not None:  # drop the worst λ per unit of price first
        def rank(k: str, j: int) -> float:
            return float(_eig(scores[k])[j]) / prices[k]

    group_of = {k: 0 for k in names}
    if group_budgets != "none":
        if model is None or input_shape is None:
            raise ValueError("group_budgets: needs the model and its input_shape to find the layers' map sizes")
        group_of = budget_groups(output_sides(model, names, input_shape), group_budgets)
    shares = group_shares(widths, by_price, group_of, budget) if names else {}

    def choose(sub: Mapping[str, Any], share: float) -> tuple[Plan, dict[str, Any]]:
        caps_sub = {k: caps[k] for k in sub} if isinstance(caps, Mapping) else caps
        if multiple:
            return select_blocks(model, sub, graph, total=total, current=current, budget=share, multiple=multiple,
                                 caps=caps_sub, method=method, increase=increase, price=price, reference=reference,
                                 lp_threshold=lp_threshold)
        plan = _select_neurons(method, sub, marginal, prices, share, caps=caps_sub, seed=seed,
                               lp_threshold=lp_threshold, increase=increase)
        return (fit(plan, sub, marginal, increase, share, rank=rank) if plan else plan), {}

    if len(shares) <= 1:
        plan, blocks = choose(scores, budget)
        return plan, ({"blocks": blocks} if multiple else {})
    plan, blocks, groups = {}, {}, {}
    for g, share in shares.items():
        sub = {k: scores[k] for k in names if group_of[k] == g}
        part, part_info = choose(sub, share)
        plan.update(part)
        if multiple:
            blocks = part_info if not blocks else {
                **blocks, "counts": {**blocks["counts"], **part_info["counts"]},
                "objective": blocks["objective"] + part_info["objective"],
                "cost_used": blocks["cost_used"] + part_info["cost_used"], "lp_bound": None}
        groups[str(g)] = {"layers": list(sub), "share": share, "used": float(increase(part)) if part else 0.0}
    plan = {k: plan[k] for k in names if k in plan}  # graph order
    if plan:  # the groups' plans together: cross terms between neighbouring layers of two groups
        if multiple:
            plan = _drop_blocks(plan, scores, by_price, multiple, increase, budget)
            blocks["counts"] = {k: int(v.numel()) for k, v in plan.items()}
        else:
            plan = fit(plan, scores, marginal, increase, budget, rank=rank)
    log.info("group budgets (%s): %s", group_budgets,
             ", ".join(f"group {g}: {v['used']:.4g} of {v['share']:.4g}" for g, v in groups.items()))
    return plan, {**({"blocks": blocks} if multiple else {}), "groups": groups}


__all__ = ["GROUP_BUDGETS", "budget_groups", "group_shares", "layer_caps", "output_sides", "select_stage"]

