"""Hardware-aligned growth (issue 11 item 3): grouped knapsack, growth in multiples, make-divisible, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_surgery import randomise_bn

import cost_models
from hwsplit import apply_split, find_neuron_groups
from hwsplit.infra.errors import ConfigError
from hwsplit.network.families import build_seed, make_divisible
from hwsplit.run.config import GrowConfig, resolve_channel_multiple
from hwsplit.splitting.blocks import (
    block_options,
    brute_force_grouped,
    select_blocks,
    solve_grouped_knapsack,
)
from hwsplit.splitting.estimators import SplitScore


def _instance(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    layers = int(rng.integers(1, 5))
    values, costs = [], []
    for _ in range(layers):
        k = int(rng.integers(0, 4))
        # cumulative Σλ of blocks sorted most negative first: decreasing, with shrinking gains
        gains = np.sort(rng.uniform(0.05, 2.0, size=k))[::-1]
        values.append(-np.cumsum(gains))
        # step costs: a block may cross a padding boundary (big step) or not (small one)
        costs.append(np.cumsum(rng.choice([0.1, 1.0, 2.5], size=k) * rng.uniform(0.5, 1.5, size=k)))
    budget = float(rng.uniform(0.0, 6.0))
    return values, costs, budget


def _objective(choice, values) -> float:
    return float(sum(values[i][k - 1] for i, k in enumerate(choice) if k))


def _used(choice, costs) -> float:
    return float(sum(costs[i][k - 1] for i, k in enumerate(choice) if k))


def test_grouped_milp_matches_brute_force_and_lp_is_feasible_and_bounded():
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(200):
        values, costs, budget = _instance(rng)
        _, best = brute_force_grouped(values, costs, budget)
        exact, _ = solve_grouped_knapsack(values, costs, budget, method="milp")
        assert _used(exact, costs) <= budget + 1e-9
        assert _objective(exact, values) == pytest.approx(best, abs=1e-9)
        for method in ("lp", "greedy"):
            choice, bound = solve_grouped_knapsack(values, costs, budget, method=method)
            assert _used(choice, costs) <= budget + 1e-9
            assert _objective(choice, values) >= best - 1e-9  # never better than the optimum
            if method == "lp" and bound is not None:
                assert bound <= best + 1e-7  # the relaxation bounds the optimum from below
            if method == "lp":
                gaps.append(_objective(choice, values) - best)
    assert np.mean(np.asarray(gaps) <= 1e-9) >= 0.8  # the rounding is usually optimal on small instances


def test_grouped_knapsack_known_instance_prefers_a_free_block_and_a_whole_layer():
    # layer 0: one block for 1.0; layer 1: two blocks, the second free (no new padding)
    values = [np.array([-1.0]), np.array([-0.6, -1.1])]
    costs = [np.array([1.0]), np.array([1.0, 1.0])]
    assert solve_grouped_knapsack(values, costs, 1.0, method="milp")[0] == [0, 2]
    assert solve_grouped_knapsack(values, costs, 2.0, method="milp")[0] == [1, 2]
    assert solve_grouped_knapsack(values, costs, 0.0, method="milp")[0] == [0, 0]
    assert solve_grouped_knapsack(values, costs, float("inf"), method="lp")[0] == [1, 2]


def test_block_options_offer_multiples_sorted_and_stop_at_a_non_negative_block():
    ev = np.array([0.3, -1.0, -0.2, 0.1, -0.5, 0.05, 0.4, 0.2])
    lb = block_options("g", ev, 2)
    assert lb.counts == [2, 4]  # blocks {-1,-.5}, {-.2,.05}; the third {.1,.2} sums >= 0
    assert lb.values == pytest.approx([-1.5, -1.65])
    assert list(lb.order[:2]) == [1, 4]
    assert block_options("g", ev, 2, cap=0.25).counts == [2]  # cap 2 neurons of 8
    assert block_options("g", ev, 2, cap=1).counts == []  # a cap below N: no block
    assert block_options("g", ev[:1], 2).counts == []  # narrower than N


@pytest.mark.parametrize("v, divisor", [(v, d) for d in (4, 8, 16) for v in (1, 3, 7.5, 8, 11.2, 17, 24, 100, 1000.4)])
def test_make_divisible_is_torchvisions(v, divisor):
    from torchvision.models._utils import _make_divisible

    got = make_divisible(v, divisor)
    assert got == _make_divisible(v, divisor)
    assert got % divisor == 0 and got >= 0.9 * v


def test_make_divisible_values():
    assert make_divisible(8, 16) == 16
    assert make_divisible(24, 16) == 32
    assert make_divisible(11.2, 8) == 16  # 8 would lose more than 10 %
    assert make_divisible(100, 8) == 104
    with pytest.raises(ValueError, match="divisor"):
        make_divisible(10, 0)


def test_aligned_seeds_have_divisible_widths():
    model = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10, channel_multiple=16)
    spec = model.spec
    assert spec.stem_width == 16 and all(w % 16 == 0 for w in spec.widths)
    assert list(spec.widths) == [16] * 5 + [32] * 8  # 8, 8, 8, 16, 16, 24 ×6, 32, 32
    half = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10, width_mult=2.0, channel_multiple=8)
    assert list(half.spec.widths[:6]) == [16, 16, 16, 32, 32, 48]  # 2 × (8, 8, 8, 16, 16, 24)
    mlp = build_seed("mlp", {"widths": [20, 33]}, (1, 8, 8), 10, channel_multiple=8)
    assert [h.fc.out_features for h in mlp.hidden] == [24, 32]
    with pytest.raises(ValueError, match="channel_multiple"):
        build_seed("torchvision:mobilenet_v2", {"width_mult": 0.25}, (3, 32, 32), 10, channel_multiple=8)


def _scores(model, x, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in find_neuron_groups(model, x):
        if not g.splittable:
            continue
        w = model.get_submodule(g.producer).weight
        v = torch.randn(w.shape, generator=gen)
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
        out[g.name] = SplitScore(eigenvalues=torch.randn(w.shape[0], generator=gen), eigenvectors=v, group=g)
    return out


@pytest.mark.parametrize("method", ["milp", "lp"])
def test_growth_in_multiples_preserves_the_function_and_divisibility(method):
    torch.manual_seed(0)
    n = 4
    model = build_seed("mobilenet_v1", {"config": "tiny_seed"}, (1, 8, 8), 10, channel_multiple=n).eval()
    x = torch.randn(3, 1, 8, 8)
    randomise_bn(model, x)
    flops = cost_models.get_cost_model("flops")
    shape = (1, 1, 8, 8)
    for stage in range(3):
        groups = find_neuron_groups(model, torch.zeros(shape))
        scores = _scores(model, torch.zeros(shape), seed=stage)
        current = flops.total(model, shape)

        def increase(p, m=model, s=scores, t=current):
            return flops.total(apply_split(m, p, s, step=0.0), shape) - t

        plan, info = select_blocks(model, scores, groups, total=lambda m: flops.total(m, shape), current=current,
                                   budget=0.5 * current, multiple=n, method=method, increase=increase)
        assert plan, "something must be worth splitting"
        assert all(len(v) % n == 0 for v in plan.values())
        for name, chans in plan.items():  # each layer's most negative neurons, each once
            ev = scores[name].eigenvalues
            assert torch.equal(chans, chans.unique())
            assert ev[chans].max() <= ev[~torch.isin(torch.arange(ev.numel()), chans)].min()
        assert increase(plan) <= 0.5 * current * (1 + 1e-9)
        grown = apply_split(model, plan, scores, step=0.0).eval()
        with torch.no_grad():
            torch.testing.assert_close(grown(x), model(x), rtol=1e-5, atol=1e-5)
        spec = grown.spec
        assert all(w % n == 0 for w in (spec.stem_width, *spec.widths))
        model = grown


def test_grow_run_with_a_channel_multiple_keeps_widths_divisible(tmp_path):
    from hwsplit.run.grow import grow

    config = GrowConfig(data_limit=300, test_limit=60, stages=2, epochs=1, seed_epochs=1, channel_multiple=4,
                        selection="milp")
    records = grow(config, tmp_path / "run")
    assert len(records) >= 2
    for r in records:
        arch = r["architecture"]
        assert all(w % 4 == 0 for w in (arch["stem_width"], *arch["widths"]))
    assert records[1]["channel_multiple"] == 4
    assert 0 < records[1]["budget"]["option_cost_sum"] <= records[1]["budget"]["value"] * (1 + 1e-9)
    assert all(v % 4 == 0 for v in records[1]["split"].values())


@pytest.mark.parametrize("fields, message", [
    ({"channel_multiple": 0}, "channel_multiple: expected a whole number"),
    ({"channel_multiple": "16"}, "channel_multiple: expected a whole number"),
    ({"channel_multiple": True}, "channel_multiple: expected a whole number"),
    ({"channel_multiple": "auto"}, "channel_multiple: 'auto' reads the channel block of a device profile"),
    ({"channel_multiple": 8, "selection": "random"}, "channel_multiple: not available with selection random"),
    ({"channel_multiple": 8, "model": "torchvision:mobilenet_v2"}, "channel_multiple: the torchvision"),
])
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        GrowConfig(**fields)


def test_auto_reads_the_profiles_channel_block(tmp_path):
    """"auto" takes the channel block of the profile as loaded (the run's cost model's), never the file again."""
    path = str(tmp_path / "p.json")  # never read: the loaded profile is passed
    config = GrowConfig(cost="lut", cost_options={"profile": path}, channel_multiple="auto")
    assert resolve_channel_multiple(config, {"rows": [], "channel_block": 16}) == 16
    assert resolve_channel_multiple(GrowConfig(channel_multiple=8)) == 8
    assert resolve_channel_multiple(GrowConfig()) is None
    with pytest.raises(ConfigError, match=r"channel_multiple: auto needs the field 'channel_block' of the profile"):
        resolve_channel_multiple(config, {"rows": []})
    with pytest.raises(ConfigError, match="channel_block: expected a whole number"):
        resolve_channel_multiple(config, {"rows": [], "channel_block": 0})
    with pytest.raises(ConfigError, match="channel_multiple: auto needs the profile .* loaded"):
        resolve_channel_multiple(config)


def test_cli_rejects_a_bad_channel_multiple(tmp_path):
    from click.testing import CliRunner

    from cli import main

    result = CliRunner().invoke(main, ["grow", "--channel-multiple", "auto", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "channel_multiple" in result.output


def test_width_baseline_rounds_widths_to_the_channel_multiple(tmp_path):
    from hwsplit.run.baselines import width_baseline

    config = GrowConfig(data_limit=200, test_limit=40, epochs=1, seed_epochs=1, channel_multiple=8)
    records = width_baseline(config, [1.0, 1.5], tmp_path / "width", epochs=1)
    archs = [r["architecture"] for r in records]
    # the tiny digits seed (4, 4, 8, 8, 16, 16) × 1 and × 1.5, each width by make_divisible(·, 8)
    assert [archs[0]["stem_width"], *archs[0]["widths"]] == [8, 8, 8, 8, 16, 16]
    assert [archs[1]["stem_width"], *archs[1]["widths"]] == [8, 8, 16, 16, 24, 24]
