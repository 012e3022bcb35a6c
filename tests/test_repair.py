"""knapsack._repair: the step that makes a solver's answer feasible drops the WORST ratio first (docs/design.md §3)."""

from __future__ import annotations

import numpy as np

from hwsplit.splitting.knapsack import _repair, solve_knapsack

# ratios λ/c: item 0: -10, 1: -1, 2: -5, 3: -2, 4: -0.5 (worst)
VALUES = np.array([-10.0, -2.0, -5.0, -4.0, -1.0])
COSTS = np.array([1.0, 2.0, 1.0, 2.0, 2.0])
ONE_LAYER = np.zeros(5, dtype=np.int64)
NO_CAP = np.array([np.inf])


def test_over_budget_drops_worst_ratio_first():
    everything = np.ones(5, dtype=bool)  # costs 8
    # limit 4: drop item 4 (ratio -0.5, cost 2) → 6, then item 1 (-1) → 4: fits
    got = _repair(everything, VALUES, COSTS, 4.0, ONE_LAYER, NO_CAP)
    assert got.tolist() == [True, False, True, True, False]
    # limit 2: then item 3 (-2) too → 2
    got = _repair(everything, VALUES, COSTS, 2.0, ONE_LAYER, NO_CAP)
    assert got.tolist() == [True, False, True, False, False]
    assert float(COSTS[got].sum()) <= 2.0
    assert everything.all()  # the input mask is not modified


def test_it_stops_as_soon_as_the_budget_holds():
    mask = np.array([True, True, True, False, False])  # costs 4
    assert _repair(mask, VALUES, COSTS, 4.0, ONE_LAYER, NO_CAP).tolist() == mask.tolist()
    assert _repair(mask, VALUES, COSTS, 3.0, ONE_LAYER, NO_CAP).tolist() == [True, False, True, False, False]


def test_layer_caps_keep_the_best_of_each_layer():
    layer_of = np.array([0, 0, 0, 1, 1])
    caps = np.array([1.0, 1.0])
    got = _repair(np.ones(5, dtype=bool), VALUES, COSTS, np.inf, layer_of, caps)
    assert got.tolist() == [True, False, False, True, False]  # layer 0 keeps item 0, layer 1 item 3
    # caps first, then the budget: from {0, 3} (cost 3) a limit of 1 drops item 3
    got = _repair(np.ones(5, dtype=bool), VALUES, COSTS, 1.0, layer_of, caps)
    assert got.tolist() == [True, False, False, False, False]


def test_solver_answers_are_feasible_and_optimal_on_a_small_instance():
    """Brute force over all 2^5 subsets: milp's (repaired) answer is the optimum, under a cap too."""
    layer_of = np.array([0, 0, 0, 1, 1])
    for budget in (1.0, 2.5, 3.0, 4.0, 5.5):
        for caps in (np.array([np.inf, np.inf]), np.array([1.0, 1.0])):
            best = 0.0
            for bits in range(32):
                m = np.array([(bits >> i) & 1 for i in range(5)], dtype=bool)
                if COSTS[m].sum() <= budget and all(m[layer_of == k].sum() <= caps[k] for k in (0, 1)):
                    best = min(best, float(VALUES[m].sum()))
            got = solve_knapsack(VALUES, COSTS, budget, layer_of=layer_of, caps=caps, method="milp")
            assert COSTS[got].sum() <= budget and float(VALUES[got].sum()) == best, (budget, caps)
