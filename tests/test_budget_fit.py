"""select.fit_plan_to_budget with synthetic cost increases above and below the sum of marginals.

The knapsack prices one neuron at a time; the realised increase of splitting several together differs
(cross terms between neighbouring layers). Whatever ``increase`` does, the plan returned must have been
measured, and measured to fit.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from hwsplit.splitting.select import fit_plan_to_budget

# three groups; ratio λ/marginal per neuron: a: -4, -3, -2, -1; b: -0.5, -0.25; c: -6, -0.1
SCORES = {"a": SimpleNamespace(eigenvalues=torch.tensor([-4.0, -3.0, -2.0, -1.0])),
          "b": SimpleNamespace(eigenvalues=torch.tensor([-1.0, -0.5])),
          "c": SimpleNamespace(eigenvalues=torch.tensor([-18.0, -0.3]))}
MARGINAL = {"a": 1.0, "b": 2.0, "c": 3.0}
PLAN = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([0, 1]), "c": torch.tensor([0, 1])}  # Σ marginals 14


def marginal_sum(plan) -> float:
    return sum(MARGINAL[k] * v.numel() for k, v in plan.items())


class Measured:
    """An increase function that records every plan it was asked about."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, plan):
        self.calls.append({k: v.tolist() for k, v in plan.items()})
        return self.fn(plan)


def _as_lists(plan):
    return {k: sorted(v.tolist()) for k, v in plan.items()}


@pytest.mark.parametrize("name, fn", [
    ("larger: +30% and a cross term", lambda p: 1.3 * marginal_sum(p) + 0.5 * len(p)),
    ("much larger: x4", lambda p: 4.0 * marginal_sum(p)),
    ("smaller: x0.6", lambda p: 0.6 * marginal_sum(p)),
    ("equal", marginal_sum),
])
@pytest.mark.parametrize("budget", [14.0, 9.0, 4.0, 0.5])
def test_the_returned_plan_was_measured_and_fits(name, fn, budget):
    increase = Measured(fn)
    plan = fit_plan_to_budget(dict(PLAN), SCORES, MARGINAL, increase, budget)
    assert increase.calls, "never measured"
    assert increase.calls[-1] == {k: v.tolist() for k, v in plan.items()}, "returned a plan it never measured"
    assert fn(plan) <= budget * (1 + 1e-9)
    if fn(PLAN) <= budget:
        assert _as_lists(plan) == _as_lists(PLAN) and len(increase.calls) == 1  # nothing to drop


def test_drops_the_worst_ratio_first_and_no_more_than_needed():
    # Σ = 14 measured as 1.3·14 + 1.5 = 19.7 against 16: the excess 3.7 is freed by the worst ratios,
    # c1 (-0.1, marginal 3) then b1 (-0.25, 2): 11.7 → the 1.3·9 + 1.5 = 13.2 measured fits.
    increase = Measured(lambda p: 1.3 * marginal_sum(p) + 0.5 * len(p))
    plan = fit_plan_to_budget(dict(PLAN), SCORES, MARGINAL, increase, 16.0)
    assert _as_lists(plan) == {"a": [0, 1, 2, 3], "b": [0], "c": [0]}
    assert len(increase.calls) == 2


def test_after_max_rounds_it_still_measures_until_it_fits():
    """A fixed cost plus half the marginals: dropping neurons frees half what their marginals say. With
    one round, the excess 5 of the first measurement (17 vs 12) is freed in marginals (c1, b1), which
    leaves 14.5; the plan is then re-measured and trimmed one neuron at a time until it fits."""
    fn = lambda p: 0.5 * marginal_sum(p) + (10.0 if p else 0.0)  # noqa: E731
    increase = Measured(fn)
    plan = fit_plan_to_budget(dict(PLAN), SCORES, MARGINAL, increase, 12.0, max_rounds=1)
    assert fn(plan) <= 12.0 * (1 + 1e-9)
    assert increase.calls[-1] == {k: v.tolist() for k, v in plan.items()}
    # b0, a3, a2, a1 go one by one (worst ratio first); 0.5·(1 + 3) + 10 = 12 fits
    assert _as_lists(plan) == {"a": [0], "c": [0]}
    assert len(increase.calls) == 6
    # nothing fits but the empty plan, even with no rounds by marginals at all
    assert fit_plan_to_budget(dict(PLAN), SCORES, MARGINAL, Measured(fn), 5.0, max_rounds=0) == {}


def test_rank_orders_the_random_baseline():
    rank = {("a", 0): 0.9, ("a", 1): 0.1, ("a", 2): 0.2, ("a", 3): 0.3, ("b", 0): 0.4, ("b", 1): 0.5,
            ("c", 0): 0.6, ("c", 1): 0.7}
    plan = fit_plan_to_budget(dict(PLAN), SCORES, MARGINAL, marginal_sum, 6.0,
                              rank=lambda k, j: rank[(k, j)])
    # highest rank first: a0 (1), c1 (3), c0 (3), b1 (2) → 14 - 9 = 5 ≤ 6
    assert _as_lists(plan) == {"a": [1, 2, 3], "b": [0]}


# -- the record of a real run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flops_run(tmp_path_factory):
    from cli import main

    out = tmp_path_factory.mktemp("fit") / "grow"
    result = CliRunner().invoke(main, ["grow", "--cost", "flops", "--stages", "2", "--epochs", "1", "--limit", "300",
                                       "--batch-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]


def test_realised_increase_never_exceeds_the_budget(flops_run):
    for before, after in zip(flops_run, flops_run[1:]):
        realised = after["cost"]["value"] - before["cost"]["value"]
        assert 0 < realised <= after["budget"]["value"] * (1 + 1e-9), after["stage"]


def test_record_budget_used_is_the_realised_increase(flops_run):
    for before, after in zip(flops_run, flops_run[1:]):
        realised = after["cost"]["value"] - before["cost"]["value"]
        assert after["budget"]["used"] == pytest.approx(realised, rel=1e-9), after["stage"]
