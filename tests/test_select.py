"""Tests for hwsplit.splitting.knapsack and .select: the budgeted knapsack that chooses which neurons to split."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hwsplit.splitting.knapsack import METHODS, solve_knapsack
from hwsplit.splitting.select import select_neurons, select_neurons_report

REPO = Path(__file__).resolve().parents[1]
N_INSTANCES = 400


# --------------------------------------------------------------------------------------------
# Brute force reference
# --------------------------------------------------------------------------------------------

def _slack(budget: float) -> float:
    # The contract: Σ cost <= budget up to a relative 1e-9 (float summation order).
    return budget + 1e-9 * max(1.0, abs(budget))


def brute_force(values, costs, budget, layer_of, caps) -> float:
    """Optimal Σ values over all subsets satisfying budget and caps (0.0 for the empty set)."""
    n = values.size
    subsets = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    cost = subsets @ costs
    counts = subsets @ (layer_of[:, None] == np.arange(caps.size)).astype(np.float64)
    ok = (cost <= _slack(budget)) & np.all(counts <= caps, axis=1)
    return float((subsets @ values)[ok].min())


def random_instance(rng: np.random.Generator):
    """≤ 12 neurons in 1–3 groups, caps (some 0, some none), a budget that usually binds."""
    n = int(rng.integers(1, 13))
    n_layers = int(rng.integers(1, 4))
    layer_of = rng.integers(0, n_layers, n)
    values = rng.normal(size=n) - 0.3
    kind = rng.integers(3)
    if kind == 0:  # vanilla splitting: unit costs, budget = a neuron count
        costs = np.ones(n)
        budget = float(rng.integers(0, n + 1))
    else:
        if kind == 1:  # one marginal cost per group (the usual case)
            costs = rng.uniform(0.1, 2.0, n_layers)[layer_of]
        else:  # one cost per neuron
            costs = rng.uniform(0.1, 2.0, n)
        budget = float(rng.uniform(0.05, 0.8) * costs.sum())
    caps = rng.integers(0, 6, n_layers).astype(np.float64)
    caps[rng.random(n_layers) < 0.3] = np.inf
    return values, costs, budget, layer_of, caps


def check_feasible(mask, values, costs, budget, layer_of, caps):
    assert mask.dtype == bool and mask.shape == values.shape
    assert costs[mask].sum() <= _slack(budget)
    assert np.all(np.bincount(layer_of[mask], minlength=caps.size) <= caps)
    assert np.all(values[mask] < 0)


def _run_all(method: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_INSTANCES):
        values, costs, budget, layer_of, caps = random_instance(rng)
        mask = solve_knapsack(values, costs, budget, layer_of=layer_of, caps=caps, method=method)
        check_feasible(mask, values, costs, budget, layer_of, caps)
        unbounded = solve_knapsack(values, costs, math.inf, layer_of=layer_of, caps=caps, method=method)
        binding = costs[unbounded].sum() > _slack(budget)  # the budget, not only the caps, decides
        out.append((float(values[mask].sum()), brute_force(values, costs, budget, layer_of, caps), binding))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Against brute force
# --------------------------------------------------------------------------------------------

def test_milp_is_optimal():
    got, opt, _ = _run_all("milp").T
    np.testing.assert_allclose(got, opt, rtol=0, atol=1e-9)


def test_lp_rounding_is_feasible_and_near_optimal():
    got, opt, binding = _run_all("lp").T
    assert np.all(got >= opt - 1e-9)  # never better than the optimum (it is feasible)
    np.testing.assert_allclose(got[binding == 0], opt[binding == 0], rtol=0, atol=1e-9)
    # "Hard" = the budget binds and something is worth taking: 135 of the 400 seeded instances.
    # Measured there: LP + rounding optimal on 128/135 (94.8 %), mean objective / optimum 0.9970,
    # worst 0.769 (ratio greedy alone: 91.1 %, 0.9891, 0.613). Thresholds leave some room.
    hard = (binding == 1) & (opt < 0)
    assert hard.sum() >= 100
    assert (np.abs(got[hard] - opt[hard]) <= 1e-9).mean() >= 0.9
    ratio = got[hard] / opt[hard]
    assert ratio.mean() >= 0.99
    assert ratio.min() >= 0.5


def test_greedy_is_feasible():
    got, opt, binding = _run_all("greedy").T
    assert np.all(got >= opt - 1e-9)
    hard = (binding == 1) & (opt < 0)
    assert (np.abs(got[hard] - opt[hard]) <= 1e-9).mean() >= 0.8


def test_lp_bound_is_a_lower_bound():
    rng = np.random.default_rng(1)
    for _ in range(50):
        values, costs, budget, layer_of, caps = random_instance(rng)
        scores = {f"g{g}": values[layer_of == g] for g in range(caps.size)}
        cost_map = {f"g{g}": costs[layer_of == g] for g in range(caps.size)}
        cap_map = {f"g{g}": (None if math.isinf(caps[g]) else int(caps[g])) for g in range(caps.size)}
        _, info = select_neurons_report(scores, cost_map, budget, caps=cap_map, method="lp")
        opt = brute_force(values, costs, budget, layer_of, caps)
        if info.lp_bound is not None:
            assert info.lp_bound <= opt + 1e-7
        assert info.objective >= opt - 1e-9
        assert info.cost_used <= _slack(budget)


# --------------------------------------------------------------------------------------------
# select_neurons: the named-group API
# --------------------------------------------------------------------------------------------

def test_select_neurons_matches_solver_and_returns_sorted_long_tensors():
    import torch

    rng = np.random.default_rng(2)
    for method in METHODS:
        for _ in range(30):
            values, costs, budget, layer_of, caps = random_instance(rng)
            names = [f"features.{g}" for g in range(caps.size)]
            scores = {nm: SimpleNamespace(eigenvalues=torch.tensor(values[layer_of == g]))
                      for g, nm in enumerate(names)}
            cost_map = {nm: costs[layer_of == g].tolist() for g, nm in enumerate(names)}
            cap_map = {nm: (None if math.isinf(caps[g]) else int(caps[g])) for g, nm in enumerate(names)}
            plan = select_neurons(scores, cost_map, budget, caps=cap_map, method=method)
            chosen = 0.0
            for nm, idx in plan.items():
                assert idx.dtype == torch.long and idx.numel() > 0
                assert torch.equal(idx, torch.sort(idx).values)
                g = names.index(nm)
                chosen += float(values[layer_of == g][idx.numpy()].sum())
            if method == "milp":
                assert chosen == pytest.approx(brute_force(values, costs, budget, layer_of, caps), abs=1e-9)


def test_vanilla_splitting_unit_costs_picks_most_negative():
    ev = {"a": np.array([-3.0, 0.5, -1.0, -0.1]), "b": np.array([-2.0, -0.5, 1.0])}
    for method in METHODS:
        plan = select_neurons(ev, {"a": 1.0, "b": 1.0}, 3, method=method)
        assert {k: v.tolist() for k, v in plan.items()} == {"a": [0, 2], "b": [0]}


def test_cost_aware_choice_differs_from_vanilla():
    # "a" neurons are better per neuron but 10x as expensive: with budget 10, two "b"s beat one "a".
    ev = {"a": np.array([-1.0, -1.0]), "b": np.array([-0.6, -0.6])}
    plan = select_neurons(ev, {"a": 10.0, "b": 1.0}, 10.0, method="milp")
    assert set(plan) == {"b"} and plan["b"].tolist() == [0, 1]


def test_score_forms_accepted():
    import torch

    t = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    for s in (t, SimpleNamespace(eigenvalues=t), [-1.0, -2.0, 0.5], np.array([-1.0, -2.0, 0.5]),
              SimpleNamespace(eigenvalues=t.to(torch.bfloat16))):
        plan = select_neurons({"x": s}, {"x": 1.0}, math.inf)
        assert plan["x"].tolist() == [0, 1]


def test_infinite_budget_takes_all_candidates_within_caps():
    ev = {"a": np.array([-1.0, -5.0, -3.0, 2.0, -2.0]), "b": np.arange(10.0) - 8.0}
    costs = {"a": 7.0, "b": 3.0}
    assert {k: v.tolist() for k, v in select_neurons(ev, costs, math.inf).items()} == {
        "a": [0, 1, 2, 4], "b": [0, 1, 2, 3, 4, 5, 6, 7]}
    plan = select_neurons(ev, costs, math.inf, caps=2)  # int: every group
    assert {k: v.tolist() for k, v in plan.items()} == {"a": [1, 2], "b": [0, 1]}
    plan = select_neurons(ev, costs, math.inf, caps=0.25)  # fraction of width, floor, at least 1
    assert {k: v.tolist() for k, v in plan.items()} == {"a": [1], "b": [0, 1]}
    plan = select_neurons(ev, costs, math.inf, caps={"a": 1})  # mapping; missing = no cap
    assert {k: v.tolist() for k, v in plan.items()} == {"a": [1], "b": list(range(8))}
    plan = select_neurons(ev, costs, math.inf, caps={"a": 0, "b": None})
    assert set(plan) == {"b"}


def test_threshold():
    ev = {"a": np.array([-0.05, -0.5, -1.0])}
    assert select_neurons(ev, {"a": 1.0}, math.inf, threshold=-0.1)["a"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="threshold"):
        select_neurons(ev, {"a": 1.0}, 1.0, threshold=0.1)


def test_report_numbers():
    ev = {"a": np.array([-1.0, -2.0]), "b": np.array([-4.0, 3.0])}
    plan, info = select_neurons_report(ev, {"a": 1.0, "b": 2.5}, 3.5, method="milp")
    assert {k: v.tolist() for k, v in plan.items()} == {"a": [1], "b": [0]}
    assert info.objective == -6.0 and info.cost_used == 3.5 and info.n_candidates == 3
    assert info.n_selected == 2 and info.counts == {"a": 1, "b": 1} and info.method == "milp"


# --------------------------------------------------------------------------------------------
# Nothing to do: empty, logged, never an error
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_empty_results(method, caplog):
    pos = {"a": np.array([0.1, 0.0, 2.0]), "b": np.array([1.0])}
    neg = {"a": np.array([-1.0, -2.0]), "b": np.array([-0.5])}
    costs = {"a": 5.0, "b": 3.0}
    with caplog.at_level(logging.INFO, logger="hwsplit.splitting"):
        assert select_neurons(pos, costs, 100.0, method=method) == {}
        assert select_neurons(neg, costs, 2.9, method=method) == {}  # budget below every cost
        assert select_neurons(neg, costs, 0.0, method=method) == {}
        assert select_neurons(neg, costs, -1.0, method=method) == {}
        assert select_neurons(neg, costs, 100.0, caps=0, method=method) == {}
        assert select_neurons({}, {}, 100.0, method=method) == {}
    assert any("nothing selected" in r.getMessage() for r in caplog.records)
    assert not solve_knapsack(np.zeros(0), np.zeros(0), 1.0, method=method).any()
    assert not solve_knapsack(np.array([1.0, -1.0]), np.array([1.0, 2.0]), 1.5, method=method).any()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_costs, match", [
    ({"a": 1.0}, "'b'"),                        # missing group
    ({"a": 1.0, "b": 0.0}, "'b'"),              # non-positive
    ({"a": -1.0, "b": 1.0}, "'a'"),
    ({"a": 1.0, "b": math.nan}, "'b'"),         # non-finite
    ({"a": math.inf, "b": 1.0}, "'a'"),
    ({"a": [1.0, 2.0, 3.0], "b": 1.0}, "'a'"),  # wrong length
    ({"a": [1.0, -2.0], "b": 1.0}, "'a'"),
    ({"a": "x", "b": 1.0}, "'a'"),
])
def test_bad_costs(bad_costs, match):
    ev = {"a": np.array([-1.0, -2.0]), "b": np.array([-1.0])}
    with pytest.raises(ValueError, match=match):
        select_neurons(ev, bad_costs, 10.0)


def test_bad_arguments():
    ev = {"a": np.array([-1.0, -2.0])}
    with pytest.raises(ValueError, match="method"):
        select_neurons(ev, {"a": 1.0}, 1.0, method="simplex")
    with pytest.raises(ValueError, match="method"):
        solve_knapsack(np.array([-1.0]), np.array([1.0]), 1.0, method="dp")
    with pytest.raises(ValueError, match="'a'"):
        select_neurons({"a": np.array([-1.0, math.nan])}, {"a": 1.0}, 1.0)
    with pytest.raises(ValueError, match="'a'"):
        select_neurons({"a": np.ones((2, 2))}, {"a": 1.0}, 1.0)
    for caps in (1.5, -1, True, "2", {"a": -2}, {"a": 0.0}):
        with pytest.raises(ValueError, match="caps"):
            select_neurons(ev, {"a": 1.0}, 1.0, caps=caps)
    with pytest.raises(ValueError, match="budget"):
        select_neurons(ev, {"a": 1.0}, math.nan)
    with pytest.raises(ValueError, match="costs"):
        solve_knapsack(np.array([-1.0]), np.array([0.0]), 1.0)
    with pytest.raises(ValueError, match="layer_of"):
        solve_knapsack(np.array([-1.0]), np.array([1.0]), 1.0, caps=np.array([1.0]))


# --------------------------------------------------------------------------------------------
# Purity and scale
# --------------------------------------------------------------------------------------------

def test_import_does_not_pull_in_torch():
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, hwsplit.splitting.knapsack, hwsplit.splitting.select; print('torch' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


def _big_instance(per_neuron_costs: bool = False):
    rng = np.random.default_rng(0)
    n_layers, width = 20, 500
    values = rng.normal(size=n_layers * width) - 0.2
    layer_of = np.repeat(np.arange(n_layers), width)
    costs = rng.uniform(1.0, 100.0, n_layers * width if per_neuron_costs else n_layers)
    costs = costs if per_neuron_costs else costs[layer_of]
    caps = np.full(n_layers, 100.0)
    budget = 0.15 * costs[values < 0].sum()
    return values, costs, budget, layer_of, caps


@pytest.mark.parametrize("per_neuron_costs", [False, True])
def test_lp_scale(per_neuron_costs):
    values, costs, budget, layer_of, caps = _big_instance(per_neuron_costs)
    solve_knapsack(values[:50], costs[:50], 100.0, method="lp")  # warm up
    # CPU time of this process, best of 3: other processes on a loaded machine stretch wall-clock time
    # (the 1 s bound once failed on 2 shared cores), not the work the solve does
    elapsed_s = []
    for _ in range(3):
        t0 = time.process_time()
        mask = solve_knapsack(values, costs, budget, layer_of=layer_of, caps=caps, method="lp")
        elapsed_s.append(time.process_time() - t0)
    check_feasible(mask, values, costs, budget, layer_of, caps)
    assert min(elapsed_s) < 1.0, f"LP on 20 x 500 neurons took {min(elapsed_s):.3f} s of CPU"
    assert costs[mask].sum() > 0.99 * budget  # the budget binds and is nearly used


def test_milp_time_limit_still_feasible():
    values, costs, budget, layer_of, caps = _big_instance(per_neuron_costs=True)
    mask = solve_knapsack(values, costs, budget, layer_of=layer_of, caps=caps, method="milp",
                          time_limit_s=0.2)
    check_feasible(mask, values, costs, budget, layer_of, caps)
    greedy = solve_knapsack(values, costs, budget, layer_of=layer_of, caps=caps, method="greedy")
    assert values[mask].sum() <= values[greedy].sum() + 1e-9
