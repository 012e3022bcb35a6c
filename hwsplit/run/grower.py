"""Grow a model inside your own training loop: one score → price → select → split step.

    grower = Grower(model, example_input, cost="flops", growth_ratio=0.5)
    for round in range(3):
        train(model, optimizer, loader)              # your loop, your data, your precision
        old, model = model, grower.step(model, loader)
        grower.carry_optimizer(optimizer, old, model)  # or build a new optimizer
        if grower.stopped:
            break

:meth:`Grower.step` is the stage of ``grow`` (docs/design.md §5, steps 2–5) without the run
directory: the cost model's total and marginal costs on the current architecture and the budget
B = min(growth_ratio × C, budget − C) (priced first: adaptive scoring stops on the knapsack's cut,
:func:`hwsplit.splitting.select.knapsack_cut`), splitting indices on the caller's loader
(:func:`hwsplit.splitting.score.splitting_indices`; every batch, or with ``scoring="adaptive"`` a subsample),
the selection (:meth:`Grower._select`, the one place that
decides the plan), and the function-preserving split (:func:`hwsplit.splitting.surgery.apply_split`).
:func:`hwsplit.run.grow.grow` runs its stages through :meth:`Grower.grow_step`, so the command line and
a user's loop grow a network the same way.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import cost_models
from hwsplit.infra.distributed import all_ranks_true, broadcast_object, world_size
from hwsplit.network.graph import NeuronGroup, find_neuron_groups
from hwsplit.splitting.estimators import SplitScore
from hwsplit.splitting.knapsack import PRICES
from hwsplit.splitting.recipe import GROUP_BUDGETS, select_stage
from hwsplit.splitting.ritz import RITZ_ALLOCATIONS, AdaptiveScoring
from hwsplit.splitting.score import METHODS as SPLIT_METHODS
from hwsplit.splitting.score import (
    SCORINGS,
    SPLIT_CANDIDATES,
    predicted_loss_change,
    scoring_record,
    significant_scores,
    splitting_indices,
)
from hwsplit.splitting.select import SELECTIONS, knapsack_cut
from hwsplit.splitting.surgery import apply_split, split_sources

log = logging.getLogger(__name__)

STOP_NO_NEGATIVE = "no neuron has a negative splitting index"
STOP_BUDGET = "budget reached"
#: Cost models a Grower builds by name (the others need a device profile: pass the model itself).
COSTS_BY_NAME = ("flops", "none")
#: How :func:`carry_optimizer` fills the optimizer state of split offspring.
OFFSPRING_STATE = ("fresh", "parent")


@dataclass
class GrowthStep:
    """What one :meth:`Grower.grow_step` did. ``model`` is the grown model (the input model when
    nothing was split: ``plan`` empty and ``stop_reason`` set); ``groups`` its neuron groups;
    ``scores`` the splitting indices as scored (with ``split_candidates="significant"`` the plan was
    chosen on them with λ set to 0 where it is not below 0 beyond its error bar,
    :func:`hwsplit.splitting.score.significant_scores`); ``record`` the step's record (also appended to
    :attr:`Grower.records`; None when nothing was split); ``sources`` the split's index maps
    (:func:`hwsplit.splitting.surgery.split_sources`)."""

    model: nn.Module
    groups: list[NeuronGroup]
    scores: dict[str, SplitScore]
    plan: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    sources: dict[str, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    stop_reason: str | None = None


@dataclass
class _Prices:
    """A step's prices: the network's cost, each group's marginal cost of one channel and the budget B (all in
    the cost model's unit), and the seconds they took."""

    total: float
    marginal: Mapping[str, float]
    budget: float
    seconds: float


@dataclass
class _Choice:
    """A step's selection: every index (``eig``) and how many are negative, the scoring record, the candidates
    the plan was chosen from, the plan (``{group: channels}``) with ``select_stage``'s info, or ``stop_reason``."""

    eig: torch.Tensor
    n_negative: int
    scoring: dict[str, Any]
    candidates: Mapping[str, SplitScore]
    plan: dict[str, torch.Tensor] = field(default_factory=dict)
    chosen_by: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    seconds: float = 0.0


@dataclass
class _Split:
    """A step's split: the grown model, its groups, the index maps, its cost and the losses around the split."""

    model: nn.Module
    groups: list[NeuronGroup]
    sources: dict[str, tuple[torch.Tensor | None, ...]]
    total: float
    loss_before: float | None
    loss_after: float | None
    seconds: float


def _describe_unsplittable(model: nn.Module, groups: list[NeuronGroup]) -> str:
    if not groups:
        return f"{type(model).__name__} has no Conv2d (groups=1) or Linear layer, the layers hwsplit splits"
    reasons = "; ".join(f"{g.name}: {g.reason}" for g in groups)
    return f"no layer of {type(model).__name__} can be split ({reasons})"


class Grower:
    """Grows ``model`` by splitting neurons, one :meth:`step` at a time, in the caller's training loop.

    ``example_input``: one batch the model accepts (shapes matter, values do not); the cost model
    prices one sample of that shape (batch 1). ``cost``: ``"flops"`` (MACs), ``"none"`` (1 per
    neuron: vanilla splitting) or a cost model object (``cost_models.get_cost_model("lut",
    profile=...)``). ``growth_ratio``: a step's budget as a fraction of the current cost;
    ``budget``: an absolute limit on the network's cost, in the cost model's unit (no step grows
    past it). ``selection``: ``lp``, ``milp``, ``greedy`` or ``random`` (:data:`hwsplit.splitting.select.SELECTIONS`).
    ``split_step``: the offspring step ε in weight units. ``device``: where the grown model goes
    (default: where ``model``'s parameters are). ``split_method``, ``split_epochs``, ``split_lr``,
    ``split_vectors``, ``split_allocation``: the scoring options of ``grow`` (README, CLI reference).
    ``scoring``: ``"full"`` (every batch of the loader, the default) or ``"adaptive"`` (a subsample that
    stops when the knapsack's cut is decided within the indices' error bars:
    :class:`hwsplit.splitting.ritz.AdaptiveScoring` with ``scoring_tolerance``, ``scoring_z``, ``scoring_min`` and
    ``scoring_cap``; needs ``split_method="rayleigh"``, ``split_vectors`` >= 1, ``split_epochs`` 1 and a
    loader with a ``len()``). ``split_candidates``: ``"all"`` (every negative index, the default) or
    ``"significant"`` (only λ + scoring_z·SE < 0; needs the Rayleigh–Ritz error bars).
    ``max_layer_growth``: cap per layer and step (fraction of its width). ``channel_multiple``: grow
    every layer by multiples of N channels (docs/design.md §3). ``seed``: scoring and random
    selection are seeded by ``seed`` and the step number. ``first_step``: the number of the first
    step (grow's stage number). ``progress`` wraps long loops (tqdm-like).

    Raises ``ValueError`` naming the field for a bad option, and, at construction, for a model the
    tracer cannot read or with no splittable layer (every layer named with the reason).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, cost: str | Any = "flops",
                 growth_ratio: float = 0.5, budget: float | None = None, selection: str = "lp",
                 split_step: float = 1e-2, device: str | torch.device | None = None, split_method: str = "rayleigh",
                 split_epochs: int = 1, split_lr: float = 0.05, split_vectors: int = 6,
                 split_allocation: str = "cost", scoring: str = "full", scoring_tolerance: float = 0.05,
                 scoring_z: float = 2.0, scoring_min: float = 0.05, scoring_cap: float = 0.25,
                 split_candidates: str = "all", max_layer_growth: float | None = None,
                 channel_multiple: int | None = None, seed: int = 0, first_step: int = 1,
                 price: str = "linear", group_budgets: str = "none", max_widths: str | list[int] | None = None,
                 lp_threshold: float | None = None, family: str | None = None,
                 progress: Callable[[Iterable, str, int], Iterable] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
            raise ValueError("example_input: expected a tensor holding one batch (batch dimension first)")
        if isinstance(cost, str):
            if cost not in COSTS_BY_NAME:
                raise ValueError(f"cost: expected one of {', '.join(COSTS_BY_NAME)} or a cost model object "
                                 f"(cost_models.get_cost_model(...)), got {cost!r}")
            cost = cost_models.get_cost_model(cost)
        elif not isinstance(cost, cost_models.CostModel):
            raise ValueError(f"cost: {type(cost).__name__} is not a cost model (needs name, unit, total, marginal)")
        checks = {
            "growth_ratio": _number(growth_ratio) and growth_ratio > 0,
            "budget": budget is None or (_number(budget) and budget > 0),
            "split_step": _number(split_step) and split_step >= 0,
            "split_epochs": _int(split_epochs) and split_epochs >= 1,
            "split_lr": _number(split_lr) and split_lr > 0,
            "split_vectors": _int(split_vectors) and split_vectors >= 0,
            "scoring_tolerance": _number(scoring_tolerance) and scoring_tolerance >= 0,
            "scoring_z": _number(scoring_z) and scoring_z > 0,
            "scoring_min": _number(scoring_min) and 0 < scoring_min <= 1,
            "scoring_cap": _number(scoring_cap) and 0 < scoring_cap <= 1,
            "max_layer_growth": max_layer_growth is None or (_number(max_layer_growth) and 0 < max_layer_growth <= 1),
            "channel_multiple": channel_multiple is None or (_int(channel_multiple) and channel_multiple >= 1),
            "seed": _int(seed),
            "first_step": _int(first_step),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {locals()[name]!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {', '.join(SELECTIONS)}, got {selection!r}")
        if split_method not in SPLIT_METHODS:
            raise ValueError(f"split_method: expected one of {', '.join(SPLIT_METHODS)}, got {split_method!r}")
        if split_allocation not in RITZ_ALLOCATIONS:
            raise ValueError(f"split_allocation: expected one of {', '.join(RITZ_ALLOCATIONS)}, "
                             f"got {split_allocation!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring: expected one of {', '.join(SCORINGS)}, got {scoring!r}")
        if split_candidates not in SPLIT_CANDIDATES:
            raise ValueError(f"split_candidates: expected one of {', '.join(SPLIT_CANDIDATES)}, "
                             f"got {split_candidates!r}")
        has_errors = split_method == "rayleigh" and split_vectors > 0
        if scoring == "adaptive" and not (has_errors and split_epochs == 1):
            raise ValueError("scoring: adaptive needs split_method rayleigh with split_vectors >= 1 and "
                             "split_epochs 1 (its error bars come from the Rayleigh-Ritz estimate)")
        if scoring == "adaptive" and scoring_min > scoring_cap:
            raise ValueError(f"scoring_min: {scoring_min} is above scoring_cap {scoring_cap}")
        if split_candidates == "significant" and not has_errors:
            raise ValueError("split_candidates: significant needs error bars: split_method rayleigh with "
                             "split_vectors >= 1")
        if price not in PRICES:
            raise ValueError(f"price: expected one of {', '.join(PRICES)}, got {price!r}")
        if group_budgets not in GROUP_BUDGETS:
            raise ValueError(f"group_budgets: expected one of {', '.join(GROUP_BUDGETS)}, got {group_budgets!r}")
        if lp_threshold is not None and not (_number(lp_threshold) and 0 < lp_threshold <= 1 and selection == "lp"):
            raise ValueError(f"lp_threshold: expected a number in (0, 1] with selection lp, got {lp_threshold!r}")
        if channel_multiple and selection == "random":
            raise ValueError("channel_multiple: not available with selection random (it draws single neurons)")
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.example_input = example_input.to(self.device)
        self.input_shape = (1, *example_input.shape[1:])
        self.cost_model = cost
        self.growth_ratio = float(growth_ratio)
        self.budget = None if budget is None else float(budget)
        self.selection = selection
        self.split_step = float(split_step)
        self.split_method, self.split_epochs, self.split_lr = split_method, split_epochs, split_lr
        self.split_vectors, self.split_allocation = split_vectors, split_allocation
        self.scoring, self.scoring_tolerance, self.scoring_z = scoring, float(scoring_tolerance), float(scoring_z)
        self.scoring_min, self.scoring_cap = float(scoring_min), float(scoring_cap)
        self.split_candidates = split_candidates
        self.max_layer_growth = max_layer_growth
        self.channel_multiple = channel_multiple
        self.price, self.group_budgets, self.max_widths = price, group_budgets, max_widths
        self.lp_threshold, self.family = lp_threshold, family
        self._flops = cost_models.get_cost_model("flops")  # a MAC-equivalent for the price transforms
        self.seed = seed
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self.last_step: GrowthStep | None = None  # the last step, with its scores (e.g. for a λ histogram)
        self.stopped = False
        self.stop_reason: str | None = None
        self._next_step = first_step
        self._traced: tuple[weakref.ref, list[NeuronGroup]] | None = None
        self._sources: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        groups = self.trace(model)  # ValueError from the tracer names the model and why
        if not any(g.splittable for g in groups):
            raise ValueError(f"model: {_describe_unsplittable(model, groups)}")
        for g in groups:
            if not g.splittable:
                log.info("%s will not grow: %s", g.name, g.reason)
        total = self.cost_model.total(model, self.input_shape)
        if self.budget is not None and self.budget <= total:
            log.warning("budget %.4g %s is not above the model's cost (%.4g): nothing will grow", self.budget,
                        self.cost_model.unit, total)

    # ------------------------------------------------------------------------------------------

    def trace(self, model: nn.Module) -> list[NeuronGroup]:
        """``model``'s neuron groups, traced once per architecture (the last one is remembered)."""
        if self._traced is not None and self._traced[0]() is model and _same_widths(model, self._traced[1]):
            return self._traced[1]
        groups = find_neuron_groups(model, self.example_input)
        self._traced = (weakref.ref(model), groups)
        return groups

    def unsplittable(self, model: nn.Module) -> dict[str, str]:
        """The layers of ``model`` that cannot grow, with the reason."""
        return {g.name: g.reason for g in self.trace(model) if not g.splittable}

    def step(self, model: nn.Module, loader: Iterable, loss_fn: Callable | None = None) -> nn.Module:
        """Score ``model`` on ``loader``, price, select, split: the grown model (a new module).

        ``loader``: re-iterable batches ``(inputs, targets)`` on any device (a DataLoader, a list);
        ``loss_fn(output, targets)``: the batch-mean loss (default cross entropy). The grown model
        computes the same function at ``split_step`` = 0; its new parameters are new tensors, so
        rebuild the optimizer or call :meth:`carry_optimizer`. When nothing is split (no negative
        splitting index, or the budget is reached) ``model`` itself is returned and :attr:`stopped`
        and :attr:`stop_reason` say why; once stopped, later calls return ``model`` unchanged.
        """
        if self.stopped:
            log.info("the grower stopped (%s): nothing is split", self.stop_reason)
            return model
        return self.grow_step(model, loader, loss_fn=loss_fn).model

    def grow_step(self, model: nn.Module, loader: Iterable, *, loss_fn: Callable | None = None,
                  stage: int | None = None, groups: list[NeuronGroup] | None = None,
                  evaluate: Callable[[nn.Module], float] | None = None) -> GrowthStep:
        """One step, with everything it used (what ``grow``'s stages record); :meth:`step` returns its model.

        ``stage``: the step number (seeds the scoring and random selection; default the next one).
        ``groups``: ``model``'s neuron groups if already traced. ``evaluate(model)`` (a loss), when
        given, is called just before and after the split (the record's ``loss_before_split`` and
        ``loss_after_split``). ``FloatingPointError`` when a splitting index is not finite.

        The step is price (:meth:`_price`) → score (:meth:`_score`) → select (:meth:`_choose`) → split
        (:meth:`_split`) → record (:meth:`_record`).
        """
        stage = self._next_step if stage is None else stage
        self._next_step = stage + 1
        groups = self.trace(model) if groups is None else groups
        prices = self._price(model, groups)
        scores, score_s = self._score(model, loader, groups, prices, stage=stage, loss_fn=loss_fn)
        unchanged = GrowthStep(model=model, groups=groups, scores=scores)
        choice = self._choose(model, scores, groups, prices, stage=stage)
        if choice.stop_reason is not None:
            return self._stop(unchanged, choice.stop_reason)
        split = self._split(model, choice, evaluate)
        timings = {"score_s": score_s, "select_s": choice.seconds + prices.seconds, "split_s": split.seconds}
        record = self._record(stage, groups, prices, scores, choice, split, timings, evaluated=evaluate is not None)
        self.records.append(record)
        self._sources[split.model] = split.sources
        log.info("step %d: split %d neurons, %s %.4g -> %.4g %s", stage, record["neurons_split"],
                 self.cost_model.name, prices.total, split.total, self.cost_model.unit)
        result = GrowthStep(model=split.model, groups=split.groups, scores=scores, plan=choice.plan, record=record,
                            sources=split.sources)
        if self.budget is not None and split.total >= self.budget * (1 - 1e-9):
            self.stopped, self.stop_reason = True, STOP_BUDGET
            result.stop_reason = STOP_BUDGET
        self.last_step = result
        return result

    def _price(self, model: nn.Module, groups: list[NeuronGroup]) -> _Prices:
        """Price: the cost model's total and marginal costs on the current architecture, and the step's budget
        B = min(growth_ratio × C, budget − C) (before scoring: adaptive scoring stops on the knapsack's cut)."""
        t0 = time.perf_counter()
        total = self.cost_model.total(model, self.input_shape)
        marginal = self.cost_model.marginal(model, self.input_shape, groups=groups)
        budget = self.growth_ratio * total
        if self.budget is not None:
            budget = min(budget, self.budget - total)
        return _Prices(total=total, marginal=marginal, budget=budget, seconds=time.perf_counter() - t0)

    def _cut(self, prices: _Prices) -> Callable[[dict[str, torch.Tensor]], dict[str, Any]]:
        """The fractional knapsack on the marginal costs, the budget and the per-layer caps: not the
        price transforms, group budgets or width ceilings of select_stage."""
        marginal, budget, caps = prices.marginal, prices.budget, self.max_layer_growth

        def cut(eigenvalues: dict[str, torch.Tensor]) -> dict[str, Any]:
            return knapsack_cut(eigenvalues, {k: marginal[k] for k in eigenvalues}, max(budget, 0.0), caps=caps)

        return cut

    def _score(self, model: nn.Module, loader: Iterable, groups: list[NeuronGroup], prices: _Prices, *, stage: int,
               loss_fn: Callable | None) -> tuple[dict[str, SplitScore], float]:
        """Score: the splitting indices on ``loader`` (every batch, or an adaptive subsample), and the seconds."""
        t0 = time.perf_counter()
        scores = splitting_indices(model, loader, method=self.split_method, epochs=self.split_epochs,
                                   lr=self.split_lr, ritz_vectors=self.split_vectors,
                                   ritz_allocation=self.split_allocation, seed=self.seed + stage, groups=groups,
                                   loss_fn=loss_fn, progress=self.progress,
                                   adaptive=self.adaptive_scoring(self._cut(prices)))
        return scores, time.perf_counter() - t0

    def _choose(self, model: nn.Module, scores: dict[str, SplitScore], groups: list[NeuronGroup], prices: _Prices,
                *, stage: int) -> _Choice:
        """Select: the candidates (every finite negative index, or the significant ones), the plan that fits the
        budget (:meth:`_select`, agreed by every rank), or why nothing is split."""
        t0 = time.perf_counter()
        eig = torch.cat([s.eigenvalues for s in scores.values()]) if scores else torch.zeros(0)
        if not bool(torch.isfinite(eig).all()):
            raise FloatingPointError("scoring: some splitting indices are not finite")
        n_negative = int((eig < 0).sum())
        scoring = scoring_record(scores, self._cut(prices), mode=self.scoring, z=self.scoring_z)
        candidates, n_candidates = scores, n_negative
        if self.split_candidates == "significant":  # λ not below 0 beyond its error bar: not a candidate
            candidates = significant_scores(scores, self.scoring_z)
            n_candidates = scoring["significant_negative"]
        choice = _Choice(eig=eig, n_negative=n_negative, scoring=scoring, candidates=candidates)
        if n_candidates == 0 and self.selection != "random":
            choice.stop_reason = STOP_NO_NEGATIVE
            return choice
        if prices.budget <= 0:
            choice.stop_reason = STOP_BUDGET
            return choice
        plan, choice.chosen_by = self._select(model, candidates, groups, prices.marginal, total=prices.total,
                                              budget=prices.budget, stage=stage)
        choice.plan = _agreed_plan(plan)
        choice.seconds = time.perf_counter() - t0
        if not choice.plan:
            choice.stop_reason = (STOP_BUDGET if n_candidates or self.selection == "random" else STOP_NO_NEGATIVE)
        return choice

    def _split(self, model: nn.Module, choice: _Choice, evaluate: Callable[[nn.Module], float] | None) -> _Split:
        """Split: the function-preserving split of the plan (offspring at ±ε along the eigenvectors), its index
        maps, the grown model's groups and its real cost (the cost model's total after, not Σ marginals, which
        over- or under-states it when costs are not additive, docs/design.md §4); the losses around it."""
        t0 = time.perf_counter()
        before = evaluate(model) if evaluate is not None else None
        grown = apply_split(model, choice.plan, choice.candidates, step=self.split_step).to(self.device)
        sources = split_sources(model, choice.plan, choice.candidates)
        groups = self.trace(grown)
        total = self.cost_model.total(grown, self.input_shape)
        after = evaluate(grown) if evaluate is not None else None
        return _Split(model=grown, groups=groups, sources=sources, total=total, loss_before=before, loss_after=after,
                      seconds=time.perf_counter() - t0)

    def _record(self, stage: int, groups: list[NeuronGroup], prices: _Prices, scores: dict[str, SplitScore],
                choice: _Choice, split: _Split, timings: dict[str, float], *, evaluated: bool) -> dict[str, Any]:
        """Record: what the step did (the keys ``grow``'s stage records keep, :data:`hwsplit.run.grow.STEP_KEYS`)."""
        plan, unit, total, marginal = choice.plan, self.cost_model.unit, prices.total, prices.marginal
        blocks: dict[str, Any] = choice.chosen_by.get("blocks", {})
        chosen = torch.cat([choice.candidates[k].eigenvalues[v] for k, v in plan.items()])
        eig = choice.eig
        return {
            "step": stage,
            "widths_before": {g.name: g.width for g in groups if g.splittable},
            "widths": {g.name: g.width for g in split.groups if g.splittable},
            "cost_before": total, "cost_after": split.total, "unit": unit,
            "split": {k: int(v.numel()) for k, v in plan.items()},
            "neurons_split": int(sum(v.numel() for v in plan.values())),
            "selection": self.selection,
            **({"channel_multiple": self.channel_multiple} if self.channel_multiple else {}),
            **({"price": self.price} if self.price != "linear" else {}),
            **({"group_budgets": choice.chosen_by["groups"]} if "groups" in choice.chosen_by else {}),
            "budget": {"value": prices.budget, "unit": unit,
                       "used": float(split.total - total),
                       "marginal_sum": float(sum(marginal[k] * v.numel() for k, v in plan.items())),
                       # block growth: Σ of the chosen options' costs, which the grouped knapsack used
                       **({"option_cost_sum": blocks["cost_used"]} if blocks else {})},
            "eigenvalues": {
                "min": float(eig.min()), "median": float(eig.median()), "negative": choice.n_negative,
                "count": int(eig.numel()),
                "per_layer_min": {k: float(s.eigenvalues.min()) for k, s in scores.items()},
                "chosen_sum": float(chosen.sum()),
            },
            "scoring_images": choice.scoring["images"],
            "scoring_decided": choice.scoring["decided"],
            "scoring": choice.scoring,
            **({"loss_before_split": split.loss_before, "loss_after_split": split.loss_after} if evaluated else {}),
            "predicted_loss_change": predicted_loss_change(float(chosen.sum()), self.split_step),
            "seconds": timings,
        }

    def adaptive_scoring(self, cut: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None,
                         ) -> AdaptiveScoring | None:
        """The :class:`~hwsplit.splitting.ritz.AdaptiveScoring` of ``scoring="adaptive"`` with the step's ``cut``, else
        None."""
        if self.scoring != "adaptive":
            return None
        return AdaptiveScoring(tolerance=self.scoring_tolerance, z=self.scoring_z, min_fraction=self.scoring_min,
                               max_fraction=self.scoring_cap, cut=cut)

    def _select(self, model: nn.Module, scores: Mapping[str, SplitScore], groups: list[NeuronGroup],
                marginal: Mapping[str, float], *, total: float, budget: float,
                stage: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The plan of one step: ``{group: LongTensor of channels}`` whose measured cost increase fits
        ``budget`` (the cost model's unit), and :func:`hwsplit.splitting.recipe.select_stage`'s info (``"blocks"``
        with a channel multiple, ``"groups"`` with group budgets).

        The knapsack of docs/design.md §3 on λ and the (transformed) marginal costs, by ``selection``, within
        group budgets, per-layer caps and width ceilings, or per-layer multiples of N
        (:func:`hwsplit.splitting.blocks.select_blocks`); then the plan's real cost on the grown architecture,
        dropping the least valuable neurons until it fits (:func:`hwsplit.splitting.select.fit_plan_to_budget`).
        """
        shape = self.input_shape
        # the random baseline drops neurons from an over-budget plan in random order too
        rank = _random_rank([self.seed, stage, 1]) if self.selection == "random" else None

        def increase(p: dict[str, torch.Tensor]) -> float:
            return self.cost_model.total(apply_split(model, p, scores, step=0.0), shape) - total

        reference = total / self._flops.total(model, shape) if self.price != "linear" else 1.0
        return select_stage(
            self.selection, scores, marginal, budget, increase=increase,
            seed=[self.seed, stage], rank=rank, max_layer_growth=self.max_layer_growth, price=self.price,
            reference=reference, group_budgets=self.group_budgets, max_widths=self.max_widths,
            lp_threshold=self.lp_threshold, family=self.family, model=model, graph=groups, input_shape=shape,
            multiple=self.channel_multiple, total=lambda m: self.cost_model.total(m, shape), current=total)

    def _stop(self, result: GrowthStep, reason: str) -> GrowthStep:
        self.stopped, self.stop_reason = True, reason
        result.stop_reason = reason
        self.last_step = result
        log.info("nothing split: %s", reason)
        return result

    def carry_optimizer(self, optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module, *,
                        offspring: str = "fresh") -> torch.optim.Optimizer:
        """:func:`carry_optimizer` for a model this grower's :meth:`step` returned from ``old_model``."""
        if new_model is old_model:
            return optimizer
        sources = self._sources.get(new_model)
        if sources is None:
            raise ValueError("new_model: not a model this grower's step returned (pass the model step gave back)")
        return carry_optimizer(optimizer, old_model, new_model, sources, offspring=offspring)


def carry_optimizer(optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module,
                    sources: Mapping[str, tuple[torch.Tensor | None, ...]], *,
                    offspring: str = "fresh") -> torch.optim.Optimizer:
    """Point ``optimizer`` at ``new_model``'s parameters, in place (a scheduler on it keeps working).

    Parameters are matched by name. A parameter whose shape the split did not change keeps its
    state as it is. One that grew keeps the state of every old entry (the offspring that stays in
    the parent's place included); the appended offspring entries (rows appended to a producer,
    BatchNorm or depthwise conv, columns appended to a consumer: ``sources``,
    :func:`hwsplit.splitting.surgery.split_sources`) get zeros with ``offspring="fresh"`` (the default: as a new
    optimizer would start them; chosen on validation, BENCHMARKS.md) or, with ``"parent"``, a copy of their
    parent's state (not rescaled). Scalar state (Adam's ``step``) is kept. A parameter of
    ``new_model`` whose name ``old_model`` lacks is added to the last parameter group, with fresh
    state. ``ValueError`` for an optimizer holding a tensor that is not ``old_model``'s, or a state
    tensor whose shape is not its parameter's (factored optimizers such as Adafactor).
    """
    if offspring not in OFFSPRING_STATE:
        raise ValueError(f"offspring: expected one of {', '.join(OFFSPRING_STATE)}, got {offspring!r}")
    old_names = {id(p): n for n, p in old_model.named_parameters()}
    old_params = dict(old_model.named_parameters())
    new_params = dict(new_model.named_parameters())
    carried: set[str] = set()
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            name = old_names.get(id(p))
            if name is None or name not in new_params:
                raise ValueError("optimizer: holds a parameter that is not one of old_model's (or that new_model "
                                 "lacks); carry_optimizer needs the optimizer of old_model")
            q = new_params[name]
            group["params"][i] = q
            carried.add(name)
            state = optimizer.state.pop(p, None)
            if state:
                optimizer.state[q] = {k: _carry_state(v, p, q, sources.get(name), offspring, name, k)
                                      for k, v in state.items()}
    added = [q for n, q in new_params.items() if n not in old_params and n not in carried]
    if added and optimizer.param_groups:
        optimizer.param_groups[-1]["params"].extend(added)
    return optimizer


def _carry_state(value: Any, old: torch.Tensor, new: torch.Tensor, index: tuple[torch.Tensor | None, ...] | None,
                 offspring: str, name: str, key: str) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or old.shape == new.shape:
        return value
    if value.shape != old.shape or index is None:
        raise ValueError(f"optimizer: state {key!r} of {name} has shape {tuple(value.shape)}, not its parameter's "
                         f"{tuple(old.shape)}; carry_optimizer maps element-wise state only")
    out = value
    for dim, idx in enumerate(index):
        if idx is None:
            continue
        idx = idx.to(value.device)
        out = out.index_select(dim, idx)
        if offspring == "fresh":
            keep = torch.arange(idx.numel(), device=value.device) < value.shape[dim]
            shape = [1] * out.dim()
            shape[dim] = -1
            out = out * keep.view(shape).to(out.dtype)
    return out.contiguous()


def _same_widths(model: nn.Module, groups: list[NeuronGroup]) -> bool:
    try:
        return all(model.get_submodule(g.producer).weight.shape[0] == g.width for g in groups)
    except AttributeError:
        return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _agreed_plan(plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's plan on every rank (the plan itself with one process).

    Every rank selects from the same reduced scores, so the plans agree; a disagreement (it would
    mean non-deterministic reductions) is logged and rank 0's plan wins, so surgery stays identical.
    """
    if world_size() == 1:
        return plan
    shared = broadcast_object(plan)
    same = sorted((k, v.tolist()) for k, v in plan.items()) == sorted((k, v.tolist()) for k, v in shared.items())
    if not all_ranks_true(same):
        log.warning("the ranks selected different plans; every rank splits rank 0's")
    return shared


def _random_rank(seed: list[int]) -> Callable[[str, int], float]:
    """A random priority per (group, channel), for dropping neurons of a random plan in random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    table: dict[tuple[str, int], float] = {}

    def rank(name: str, channel: int) -> float:
        if (name, channel) not in table:
            table[(name, channel)] = float(rng.random())
        return table[(name, channel)]

    return rank


__all__ = ["COSTS_BY_NAME", "OFFSPRING_STATE", "STOP_BUDGET", "STOP_NO_NEGATIVE", "GrowthStep", "Grower",
           "carry_optimizer"]
