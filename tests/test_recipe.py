"""The authors' selection recipe as options (issue 26): price transforms, group budgets, caps and ceilings,
the LP threshold, the preset, and their round trip through config.json and --resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cost_models
from cli import main
from hwsplit import apply_split, find_neuron_groups
from hwsplit.infra.errors import ConfigError
from hwsplit.network.families import MOBILENET_V1_AUTHORS_MAX_WIDTHS, build_seed, width_ceilings
from hwsplit.run.config import RECIPES, GrowConfig, load_config, recipe_settings
from hwsplit.splitting.estimators import SplitScore
from hwsplit.splitting.knapsack import price_transform, search_price_budget, solve_knapsack
from hwsplit.splitting.recipe import budget_groups, group_shares, layer_caps, output_sides, select_stage
from hwsplit.splitting.select import fit_plan_to_budget

TINY = ["--stages", "1", "--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _layers(spec: dict[str, tuple[int, float, float]]):
    """Hand-made layers: name → (neurons, real cost per neuron, λ of each neuron)."""
    scores = {k: SimpleNamespace(eigenvalues=torch.full((n,), lam)) for k, (n, _, lam) in spec.items()}
    marginal = {k: c for k, (_, c, _) in spec.items()}
    return scores, marginal


def _counts(plan) -> dict[str, int]:
    return {k: int(v.numel()) for k, v in plan.items()}


def _select(scores, marginal, budget, method, price, increase=None, **kwargs):
    def additive(plan):
        return sum(marginal[k] * v.numel() for k, v in plan.items())

    return select_stage(method, scores, marginal, budget, increase=increase or additive, fit=fit_plan_to_budget,
                        price=price, **kwargs)[0]


# ------------------------------------------------------------------------------------------------
# price transforms: the price chooses, the real cost limits
# ------------------------------------------------------------------------------------------------

def test_price_transforms_are_the_documented_functions():
    c = np.array([0.0, 0.5, 1.0, 16.0, -4.0])
    assert np.array_equal(price_transform(c, "linear"), c)
    np.testing.assert_allclose(price_transform(c, "sqrt"), [0, np.sqrt(0.5), 1, 4, -2])
    np.testing.assert_allclose(price_transform(c, "log"), [0, np.log1p(0.5), np.log(2), np.log(17), -np.log(5)])
    # a reference converts another unit to MAC-equivalents: 2 ms at 0.5 ms per MAC-equivalent = 4
    np.testing.assert_allclose(price_transform(2.0, "log", reference=0.5), np.log(5))
    # log1p(ΔMACs) is the authors' log(ΔMACs) within 1/ΔMACs
    assert abs(price_transform(100.0, "log") - np.log(100.0)) < 0.01
    with pytest.raises(ValueError, match="price"):
        price_transform(c, "cube")
    with pytest.raises(ValueError, match="reference"):
        price_transform(c, "log", reference=0.0)


@pytest.mark.parametrize("method", ["lp", "milp", "greedy"])
def test_sqrt_and_log_spread_growth_to_the_dear_layer_that_linear_starves(method):
    # A: 4 neurons, 16 MACs each, λ -4 (λ/c -0.25, λ/√c -1); B: 16 neurons, 1 MAC each, λ -0.5 (all ratios -0.5)
    scores, marginal = _layers({"A": (4, 16.0, -4.0), "B": (16, 1.0, -0.5)})
    picked = {p: _counts(_select(scores, marginal, 32.0, method, p)) for p in ("linear", "sqrt", "log")}
    assert picked["linear"] == {"A": 1, "B": 16}  # cheapest per MAC first, then one A
    assert picked["sqrt"] == {"A": 2}  # A is the better buy per √MAC; two of them spend the 32 MACs
    assert picked["log"] == {"A": 2}


@pytest.mark.parametrize("method", ["lp", "milp", "greedy"])
def test_what_the_price_search_leaves_of_the_real_budget_is_filled(method):
    # at 40 MACs: 3 A (48) do not fit, so the search stops at 2 A and 3 B (35); 5 more B fit the real budget
    scores, marginal = _layers({"A": (4, 16.0, -4.0), "B": (16, 1.0, -0.5)})
    assert _counts(_select(scores, marginal, 40.0, method, "sqrt")) == {"A": 2, "B": 8}
    # the authors' threshold keeps the LP's plan and adds nothing
    plan = _select(scores, marginal, 40.0, "lp", "sqrt", lp_threshold=0.99) if method == "lp" else None
    if plan is not None:
        assert _counts(plan)["A"] == 2 and sum(_counts(plan).values()) < 10


@pytest.mark.parametrize("method", ["lp", "milp", "greedy"])
def test_log_softens_more_than_sqrt(method):
    # A: 3 neurons at 100 MACs, λ -8: per √c -0.8 (B wins at -1), per log1p(c) -1.73 (A wins over B's -1.44)
    scores, marginal = _layers({"A": (3, 100.0, -8.0), "B": (100, 1.0, -1.0)})
    assert _counts(_select(scores, marginal, 200.0, method, "linear")) == {"A": 1, "B": 100}
    assert _counts(_select(scores, marginal, 200.0, method, "sqrt")) == {"A": 1, "B": 100}
    assert _counts(_select(scores, marginal, 200.0, method, "log")) == {"A": 2}


@pytest.mark.parametrize("price", ["linear", "sqrt", "log"])
@pytest.mark.parametrize("method", ["lp", "milp", "greedy", "random"])
def test_the_real_budget_is_never_exceeded(price, method):
    rng = np.random.default_rng(1)
    for trial in range(12):
        n_layers = int(rng.integers(1, 5))
        spec = {f"l{i}": (int(rng.integers(1, 9)), float(rng.choice([0.3, 1.0, 7.0, 60.0]) * rng.uniform(0.5, 2)),
                          0.0) for i in range(n_layers)}
        scores = {k: SimpleNamespace(eigenvalues=torch.tensor(rng.normal(-0.5, 1.0, n))) for k, (n, _, _) in
                  spec.items()}
        marginal = {k: c for k, (_, c, _) in spec.items()}
        budget = float(rng.uniform(0.5, 80.0))

        def superadditive(plan, marginal=marginal):  # cross terms: the joint cost exceeds Σ marginals by 15 %
            return 1.15 * sum(marginal[k] * v.numel() for k, v in plan.items())

        plan = _select(scores, marginal, budget, method, price, increase=superadditive, seed=[trial])
        assert superadditive(plan) <= budget * (1 + 1e-9), (trial, price, method)
        for v in plan.values():  # each neuron once
            assert torch.equal(v, v.unique())


def test_the_price_search_spends_as_much_as_fits():
    scores, marginal = _layers({"A": (4, 16.0, -4.0), "B": (16, 1.0, -0.5)})
    prices = {k: float(np.sqrt(c)) for k, c in marginal.items()}
    calls = []

    def solve(bp):
        calls.append(bp)
        mask = solve_knapsack(np.array([-4.0] * 4 + [-0.5] * 16), np.array([prices["A"]] * 4 + [prices["B"]] * 16),
                              bp, method="lp")
        return mask

    cost = np.array([16.0] * 4 + [1.0] * 16)
    mask = search_price_budget(solve, lambda m: float(cost[m].sum()), 40.0, high=float(4 * 4 + 16))
    assert cost[mask].sum() <= 40.0
    assert cost[mask].sum() >= 40.0 - 16.0  # nothing that fits is left: the gap is less than the dearest neuron
    assert mask[:4].sum() == 2  # two A first (the better buy per √MAC), then B's up to the real budget
    assert len(calls) <= 42


def test_lp_threshold_keeps_only_the_lp_solution_above_it():
    # one fractional item: the rounding adds what fits by ratio, the threshold keeps only β = 1
    values = np.array([-3.0, -2.0, -1.0])
    costs = np.array([2.0, 2.0, 2.0])
    default = solve_knapsack(values, costs, 5.0, method="lp")
    authors = solve_knapsack(values, costs, 5.0, method="lp", lp_threshold=0.99)
    assert default.tolist() == [True, True, False]
    assert authors.tolist() == [True, True, False]
    # budget 3: the LP takes item 0 and half of item 1; rounding fills nothing more, the threshold keeps item 0
    values = np.array([-3.0, -2.0, -0.1])
    costs = np.array([2.0, 2.0, 1.0])
    assert solve_knapsack(values, costs, 3.0, method="lp").tolist() == [True, False, True]
    assert solve_knapsack(values, costs, 3.0, method="lp", lp_threshold=0.99).tolist() == [True, False, False]
    # β = (1, 0.5, 0): a threshold of 0.5 keeps item 1 too, and the budget then drops it again
    assert solve_knapsack(values, costs, 3.0, method="lp", lp_threshold=0.5).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="lp_threshold"):
        solve_knapsack(values, costs, 3.0, method="lp", lp_threshold=1.5)


# ------------------------------------------------------------------------------------------------
# group budgets, caps and ceilings on a real network
# ------------------------------------------------------------------------------------------------

def _scores(model, shape, seed=0, negative=True):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in find_neuron_groups(model, torch.zeros(shape)):
        if not g.splittable:
            continue
        w = model.get_submodule(g.producer).weight
        v = torch.randn(w.shape, generator=gen)
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
        ev = -torch.rand(w.shape[0], generator=gen) if negative else torch.randn(w.shape[0], generator=gen)
        out[g.name] = SplitScore(eigenvalues=ev, eigenvectors=v, group=g)
    return out


def test_groups_by_map_size_as_the_authors_split_them():
    model = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10)
    names = [g.name for g in find_neuron_groups(model, torch.zeros(1, 3, 32, 32)) if g.splittable]
    sides = output_sides(model, names, (1, 3, 32, 32))
    assert [sides[n] for n in names] == [32, 32, 16, 16, 8, 8, 4, 4, 4, 4, 4, 4, 2, 2]
    # the authors' split_groups = [0, 0, 0, 0, 1, ..., 1]
    assert [budget_groups(sides, "authors")[n] for n in names] == [0] * 4 + [1] * 10
    assert [budget_groups(sides, "resolution")[n] for n in names] == [0, 0, 1, 1, 2, 2] + [3] * 6 + [4, 4]
    assert set(budget_groups(sides, "none").values()) == {0}
    mlp = build_seed("mlp", {"widths": [8, 8]}, (1, 8, 8), 10)
    mlp_names = [g.name for g in find_neuron_groups(mlp, torch.zeros(1, 1, 8, 8)) if g.splittable]
    mlp_sides = output_sides(mlp, mlp_names, (1, 1, 8, 8))
    for mode in ("authors", "resolution"):  # one group: the MLP's budget is not split
        assert set(budget_groups(mlp_sides, mode).values()) == {0}
    with pytest.raises(ValueError, match="group_budgets"):
        budget_groups(sides, "layers")


def test_group_shares_sum_to_the_budget_in_proportion_to_price_weighted_width():
    widths, prices = {"a": 8, "b": 8, "c": 24}, {"a": 9.0, "b": 4.0, "c": 1.0}
    shares = group_shares(widths, prices, {"a": 0, "b": 0, "c": 1}, 100.0)
    assert sum(shares.values()) == pytest.approx(100.0)
    assert shares[0] / shares[1] == pytest.approx((8 * 9 + 8 * 4) / (24 * 1))
    assert group_shares(widths, prices, {"a": 0, "b": 0, "c": 0}, 100.0) == {0: 100.0}


@pytest.mark.parametrize("multiple", [None, 4])
@pytest.mark.parametrize("price", ["linear", "sqrt"])
def test_each_group_stays_within_its_share_and_the_stage_within_the_budget(multiple, price):
    shape = (1, 3, 32, 32)
    model = build_seed("mobilenet_v1_cifar", {}, shape[1:], 10, channel_multiple=multiple).eval()
    flops = cost_models.get_cost_model("flops")
    scores = _scores(model, shape)
    graph = find_neuron_groups(model, torch.zeros(shape))
    current = flops.total(model, shape)
    marginal = flops.marginal(model, shape, groups=graph)

    def increase(p):
        return flops.total(apply_split(model, p, scores, step=0.0), shape) - current

    budget = 0.5 * current
    plan, info = select_stage("lp", scores, marginal, budget, increase=increase, fit=fit_plan_to_budget,
                              price=price, group_budgets="authors", model=model, graph=graph, input_shape=shape,
                              multiple=multiple, total=lambda m: flops.total(m, shape), current=current)
    groups = info["groups"]
    assert set(groups) == {"0", "1"}
    assert sum(g["share"] for g in groups.values()) == pytest.approx(budget)
    for g in groups.values():
        assert 0 < g["used"] <= g["share"] * (1 + 1e-9), g  # each group spends, and at most its share
    assert increase(plan) <= budget * (1 + 1e-9)
    group0 = set(groups["0"]["layers"])
    assert group0 == {"stem.conv", "blocks.0.pw.conv", "blocks.1.pw.conv", "blocks.2.pw.conv"}
    assert any(k in group0 for k in plan) and any(k not in group0 for k in plan)
    if multiple:
        assert all(v.numel() % multiple == 0 for v in plan.values())


def test_width_ceilings_of_the_families():
    model = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10)
    names = [g.name for g in find_neuron_groups(model, torch.zeros(1, 3, 32, 32)) if g.splittable]
    standard = width_ceilings("mobilenet_v1_cifar", "standard", names)
    assert [standard[n] for n in names] == [32, 64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]
    authors = width_ceilings("mobilenet_v1_cifar", "authors", names)
    assert [authors[n] for n in names] == MOBILENET_V1_AUTHORS_MAX_WIDTHS
    tiny = build_seed("mobilenet_v1", {}, (1, 8, 8), 10)  # the digits seed: the first five blocks' positions
    tiny_names = [g.name for g in find_neuron_groups(tiny, torch.zeros(1, 1, 8, 8)) if g.splittable]
    assert list(width_ceilings("mobilenet_v1", "standard", tiny_names).values()) == [32, 64, 128, 128, 256, 256]
    assert width_ceilings("mlp", "standard", ["hidden.0.fc"]) == {}  # no standard widths: no ceiling
    assert width_ceilings("mobilenet_v1", None, tiny_names) == {}
    assert width_ceilings("mobilenet_v1", [5] * 6, tiny_names) == dict.fromkeys(tiny_names, 5)
    with pytest.raises(ValueError, match="max_widths: 2 numbers for the 6 growing layers"):
        width_ceilings("mobilenet_v1", [5, 6], tiny_names)


def test_caps_and_ceilings_are_respected():
    assert layer_caps({"a": 10, "b": 10, "c": 40}, None, {"a": 12, "b": 8}) == {"a": 2, "b": 0, "c": None}
    assert layer_caps({"a": 10, "c": 40}, 0.5, {"a": 30}) == {"a": 5, "c": 0.5}
    shape = (1, 1, 8, 8)
    model = build_seed("mobilenet_v1", {"widths": [30, 8, 8, 16, 16]}, shape[1:], 10).eval()
    flops = cost_models.get_cost_model("flops")
    scores = _scores(model, shape)
    current = flops.total(model, shape)
    marginal = flops.marginal(model, shape)

    def increase(p):
        return flops.total(apply_split(model, p, scores, step=0.0), shape) - current

    widths = {k: len(s) for k, s in scores.items()}
    for max_widths, growth in (("standard", None), ([32, 40, 9, 8, 16, 40], None), (None, 0.25), (None, None)):
        plan, _ = select_stage("lp", scores, marginal, 10 * current, increase=increase, fit=fit_plan_to_budget,
                               max_layer_growth=growth, max_widths=max_widths, family="mobilenet_v1")
        ceilings = width_ceilings("mobilenet_v1", max_widths, list(scores))
        for k, v in plan.items():
            assert v.numel() <= widths[k]  # at most doubling per stage: the authors' min(c, ·)
            if k in ceilings:
                assert widths[k] + v.numel() <= ceilings[k], (max_widths, k)
            if growth:
                assert v.numel() <= max(1, int(growth * widths[k]))
        if max_widths == [32, 40, 9, 8, 16, 40]:  # widths 4, 30, 8, 8, 16, 16; every index negative
            assert _counts(plan) == {"stem.conv": 4, "blocks.0.pw.conv": 10, "blocks.1.pw.conv": 1,
                                     "blocks.4.pw.conv": 16}


# ------------------------------------------------------------------------------------------------
# settings: config, preset, round trip, resume, the CLI
# ------------------------------------------------------------------------------------------------

def test_the_authors_preset_and_overrides():
    assert recipe_settings(None, {"price": "log"}) == {"price": "log"}
    authors = GrowConfig(**recipe_settings("authors", {}))
    assert (authors.price, authors.group_budgets, authors.max_widths, authors.lp_threshold,
            authors.max_layer_growth, authors.recipe) == ("sqrt", "authors", "authors", 0.99, 1.0, "authors")
    over = GrowConfig(**recipe_settings("authors", {"price": "linear", "max_widths": None}))
    assert (over.price, over.max_widths, over.group_budgets) == ("linear", None, "authors")
    milp = GrowConfig(selection="milp", **recipe_settings("authors", {}, selection="milp"))
    assert milp.lp_threshold is None  # no LP to threshold
    assert set(RECIPES["authors"]) <= {f for f in GrowConfig().to_dict()}
    with pytest.raises(ConfigError, match="recipe"):
        recipe_settings("paper", {})


@pytest.mark.parametrize("fields, message", [
    ({"price": "cube"}, "price: expected one of linear, sqrt, log"),
    ({"group_budgets": True}, "group_budgets: expected one of"),
    ({"max_widths": "huge"}, "max_widths: expected standard, authors"),
    ({"max_widths": [8, 0]}, "max_widths: expected"),
    ({"lp_threshold": 0.0}, r"lp_threshold: expected a number in \(0, 1\]"),
    ({"lp_threshold": 0.99, "selection": "milp"}, "lp_threshold: only used with selection lp"),
    ({"recipe": "paper"}, "recipe: expected one of authors"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        GrowConfig(**fields)


def test_settings_round_trip_through_config_json_and_old_runs_keep_todays_behaviour(tmp_path):
    config = GrowConfig(price="log", group_budgets="resolution", max_widths=[40, 50, 60], lp_threshold=0.9,
                        recipe="authors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert load_config(tmp_path) == config
    old = {k: v for k, v in GrowConfig().to_dict().items()
           if k not in ("price", "group_budgets", "max_widths", "lp_threshold", "recipe")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    legacy = load_config(tmp_path)
    assert (legacy.price, legacy.group_budgets, legacy.max_widths, legacy.lp_threshold, legacy.recipe) == (
        "linear", "none", None, None, None)  # no ceiling: what such a run did when it was started
    assert GrowConfig().max_widths == "standard"


def test_a_digits_grow_with_the_authors_recipe_runs_and_resumes(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["grow", *TINY, "--recipe", "authors", "--out", str(run)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved[k] for k in ("price", "group_budgets", "max_widths", "lp_threshold", "max_layer_growth",
                                  "recipe")} == {"price": "sqrt", "group_budgets": "authors",
                                                 "max_widths": "authors", "lp_threshold": 0.99,
                                                 "max_layer_growth": 1.0, "recipe": "authors"}
    records = [json.loads(x) for x in (run / "stages.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[1]["neurons_split"] > 0
    assert records[1]["price"] == "sqrt"
    groups = records[1]["group_budgets"]
    assert sum(g["share"] for g in groups.values()) == pytest.approx(records[1]["budget"]["value"])
    assert all(g["used"] <= g["share"] * (1 + 1e-9) for g in groups.values())
    assert records[1]["budget"]["used"] <= records[1]["budget"]["value"] * (1 + 1e-9)
    before, after = records[0]["widths"], records[1]["widths"]
    assert all(after[k] <= 2 * before[k] for k in before)
    result = CliRunner().invoke(main, ["grow", "--resume", str(run), "--stages", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text()) == {**saved, "stages": 2}  # only the extension changed
    assert len((run / "stages.jsonl").read_text().splitlines()) == 3


def test_a_run_written_before_the_options_resumes_as_it_was(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["grow", *TINY, "--max-widths", "none", "--out", str(run)])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    for key in ("price", "group_budgets", "max_widths", "lp_threshold", "recipe"):
        del saved[key]
    (run / "config.json").write_text(json.dumps(saved))
    result = CliRunner().invoke(main, ["grow", "--resume", str(run), "--stages", "2"])
    assert result.exit_code == 0, result.output
    assert len((run / "stages.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "config.json").read_text())["max_widths"] is None


@pytest.mark.parametrize("args, message", [
    (["--lp-threshold", "0.99", "--selection", "milp"], "lp_threshold: only used with selection lp"),
    (["--max-widths", "1,2"], "max_widths: 2 numbers for the 6 growing layers"),
    (["--max-widths", "8,x"], "--max-widths"),
    (["--price", "cube"], "--price"),
])
def test_cli_rejects_bad_recipe_options_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["grow", *TINY, *args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "r" / "stages.jsonl").exists()


@pytest.mark.parametrize("method", ["lp", "milp", "greedy", "random"])
def test_the_defaults_select_what_the_stage_loop_selected_before(method):
    from hwsplit.splitting.select import select_by_name

    shape = (1, 3, 32, 32)
    model = build_seed("mobilenet_v1_cifar", {}, shape[1:], 10).eval()
    flops = cost_models.get_cost_model("flops")
    scores = _scores(model, shape, negative=False)
    current = flops.total(model, shape)
    marginal = flops.marginal(model, shape)

    def increase(p):
        return flops.total(apply_split(model, p, scores, step=0.0), shape) - current

    before = select_by_name(method, scores, {k: marginal[k] for k in scores}, 0.4 * current, seed=[3])
    before = fit_plan_to_budget(before, scores, marginal, increase, 0.4 * current)
    for max_widths in (None, "standard"):  # the standard ceilings are far above the seed: they do not bind
        now, info = select_stage(method, scores, marginal, 0.4 * current, increase=increase, fit=fit_plan_to_budget,
                                 seed=[3], max_widths=max_widths, family="mobilenet_v1_cifar")
        assert {k: v.tolist() for k, v in now.items()} == {k: v.tolist() for k, v in before.items()}
        assert info == {}
