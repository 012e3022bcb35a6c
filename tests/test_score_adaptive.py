"""Adaptive scoring (issue 31): the error bar of a λ, the stopping rule, the knapsack's cut, the grow options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import batches, synthetic_data, tiny_mobilenet, train_briefly

from cli import main
from hwsplit import Grower, splitting_indices
from hwsplit.infra.errors import ConfigError
from hwsplit.run.config import GrowConfig
from hwsplit.splitting.estimators import SplitScore
from hwsplit.splitting.ritz import AdaptiveScoring, BatchMeans, decided, ritz_estimate
from hwsplit.splitting.score import scoring_record, significant_scores
from hwsplit.splitting.select import knapsack_cut, select_neurons


def _noisy_grams(count: int, n: int, sigma: torch.Tensor, gen: torch.Generator,
                 lam: tuple[float, ...] = (-1.0, 0.5, 2.0)) -> torch.Tensor:
    """``count`` per-batch 3×3 matrices per channel: diag(lam) plus symmetric noise whose (0, 0) entry has
    standard deviation sigma[k] in batch k (the other entries the same scale)."""
    b = len(lam)
    noise = torch.randn(count, n, b, b, generator=gen, dtype=torch.float64)
    noise = (noise + noise.transpose(2, 3)) / 2 ** 0.5  # symmetric: variance 1 off the diagonal, 2 on it
    noise.diagonal(dim1=2, dim2=3).div_(2 ** 0.5)  # every entry of variance 1
    return torch.diag(torch.tensor(lam, dtype=torch.float64)) + sigma.reshape(-1, 1, 1, 1) * noise


def test_error_bar_of_lambda_on_a_synthetic_S_with_known_variance():
    """λ of diag(−1, 0.5, 2) + noise: to first order λ̂ − λ is the weighted mean of the (0, 0) noise, whose
    standard deviation is known; the SE from the batch-to-batch spread must match it and cover at 2 SE."""
    gen = torch.Generator().manual_seed(0)
    count, n = 40, 4000  # 40 batches; 4,000 channels are 4,000 independent repetitions
    sizes = torch.tensor([64.0] * 30 + [16.0] * 10)  # unequal batches: noise variance ∝ 1 / size
    sigma = 0.3 * (64.0 / sizes).sqrt()
    grams = _noisy_grams(count, n, sigma, gen)
    lam, y, se = ritz_estimate(grams, sizes)
    w = sizes / sizes.sum()
    true_sd = float((w ** 2 * sigma ** 2).sum().sqrt())  # SD of Σ w_k ε_k
    assert float(se.mean()) == pytest.approx(true_sd, rel=0.05)
    assert float((lam + 1.0).std()) == pytest.approx(true_sd, rel=0.06)
    coverage = float(((lam + 1.0).abs() <= 2 * se).double().mean())
    assert 0.93 <= coverage <= 0.97
    assert y.shape == (n, 3) and torch.allclose(y.norm(dim=1), torch.ones(n, dtype=y.dtype))
    # the spread of the per-batch λ_min(G_k) is not the error bar: it is biased low and far wider
    per_batch = torch.linalg.eigvalsh(grams)[..., 0]
    assert float(per_batch.mean()) < -1.0 - 0.01
    # batch means (groups of batches, as the scorer keeps them) give the same SE within its own noise
    means = BatchMeans(groups=8)
    for k in range(count):
        means.add({"g": grams[k]}, float(w[k]))
    assert len(means.sums) <= 16 and sum(means.counts) == count
    m_lam, _, m_se = means.estimate(["g"])["g"]
    assert torch.allclose(m_lam, lam, atol=1e-9)
    assert float(m_se.mean()) == pytest.approx(true_sd, rel=0.15)


def test_batch_means_without_merging_equal_the_direct_estimate():
    gen = torch.Generator().manual_seed(1)
    grams = _noisy_grams(10, 50, torch.full((10,), 0.2), gen)
    weights = torch.arange(1.0, 11.0)
    means = BatchMeans(groups=32)
    for k in range(10):
        means.add({"g": grams[k]}, float(weights[k]))
    lam, y, se = ritz_estimate(grams, weights)
    m_lam, m_y, m_se = means.estimate(["g"])["g"]
    assert torch.allclose(m_lam, lam, atol=1e-12) and torch.allclose(m_se, se, rtol=1e-9)
    assert torch.allclose((m_y * y).sum(1).abs(), torch.ones(50, dtype=y.dtype))


def test_decided_is_the_side_of_the_cut_beyond_z_standard_errors():
    lam = torch.tensor([-3.0, -1.0, -0.1, 0.5])
    se = torch.tensor([1.0, 1.0, 0.2, 0.1])
    assert decided(lam, se, torch.tensor(-1.5), 1.0).tolist() == [True, False, True, True]
    assert decided(lam, se, 0.0, 2.0).tolist() == [True, False, False, True]


@pytest.fixture(scope="module")
def many_batches():
    """The tiny MobileNet trained on 256 images, then 1,536 fresh ones in 96 batches of 16."""
    x, y = synthetic_data()
    model = train_briefly(tiny_mobilenet(), batches(x, y, 64))
    fx, fy = synthetic_data(1536, seed=3)
    return model, batches(fx, fy, 16)


def _rule_holds(scores, tolerance, z, cut=None):
    undecided = below = 0
    for name, s in scores.items():
        t = torch.as_tensor(cut[name], dtype=s.eigenvalues.dtype) if cut else torch.zeros_like(s.eigenvalues)
        undecided += int((~decided(s.eigenvalues, s.stderr, t, z)).sum())
        below += int((s.eigenvalues < t).sum())
    return undecided <= tolerance * max(below, 1), undecided, below


def test_stopping_rule_stops_where_the_tolerance_is_first_met(many_batches):
    """With a check after every batch, the call stops at the first batch where at most ``tolerance`` × the
    neurons below the cut are undecided: the rule holds on what it returns, and the same call capped one batch
    earlier (same batches, same descent) returns indices on which it does not hold."""
    model, data = many_batches
    rule = dict(tolerance=0.3, z=1.0, min_fraction=0.1, check_every=1)
    scores = splitting_indices(model, data, adaptive=AdaptiveScoring(max_fraction=1.0, **rule))
    first = next(iter(scores.values()))
    assert first.stopped == "tolerance"
    assert all(s.images == first.images and s.stderr is not None for s in scores.values())
    used = first.images // 16
    assert 10 < used < len(data)  # after the minimum (0.1 of 96 batches: 10), before the end
    holds, undecided, below = _rule_holds(scores, 0.3, 1.0)
    assert holds and below > 0
    earlier = splitting_indices(model, data, adaptive=AdaptiveScoring(max_fraction=(used - 1) / len(data), **rule))
    assert next(iter(earlier.values())).stopped == "cap"
    assert next(iter(earlier.values())).images == first.images - 16
    assert not _rule_holds(earlier, 0.3, 1.0)[0]
    # a tolerance no run can meet reads up to the cap; one every run meets stops at the minimum
    capped = splitting_indices(model, data, adaptive=AdaptiveScoring(tolerance=0.0, z=50.0, max_fraction=0.5))
    assert next(iter(capped.values())).stopped == "cap" and next(iter(capped.values())).images == 48 * 16
    loose = splitting_indices(model, data, adaptive=AdaptiveScoring(tolerance=1e6, min_fraction=0.2))
    assert next(iter(loose.values())).stopped == "tolerance" and next(iter(loose.values())).images == 20 * 16


def test_adaptive_indices_track_the_full_pass_and_the_cut_is_used(many_batches):
    model, data = many_batches
    full = splitting_indices(model, data)
    assert next(iter(full.values())).images == 1536 and next(iter(full.values())).stopped is None
    costs = {name: float(i + 1) for i, name in enumerate(full)}
    calls = []

    def cut(eigenvalues):
        calls.append(sorted(eigenvalues))
        return knapsack_cut(eigenvalues, {k: costs[k] for k in eigenvalues}, 5.0)

    sub = splitting_indices(model, data, adaptive=AdaptiveScoring(cut=cut, max_fraction=0.5))
    assert calls and calls[0] == sorted(full)
    for name in full:
        e, r = full[name].eigenvalues, sub[name].eigenvalues
        # the subsample's λ lies within a few of its error bars of the full pass's λ (another descent, another
        # subspace, so not within one)
        assert float(((r - e).abs() / (sub[name].stderr + 1e-3 * e.abs().max())).median()) < 4.0, name


def test_adaptive_refuses_settings_without_error_bars(many_batches):
    model, data = many_batches
    for kwargs in ({"ritz_vectors": 0}, {"epochs": 2}, {"method": "exact"}, {"eigenvalue_pass": True}):
        with pytest.raises(ValueError, match="adaptive"):
            splitting_indices(model, data, adaptive=AdaptiveScoring(), **kwargs)
    with pytest.raises(ValueError, match="min_fraction"):
        AdaptiveScoring(min_fraction=0.5, max_fraction=0.25)
    with pytest.raises(ValueError, match="z"):
        AdaptiveScoring(z=0)


def test_knapsack_cut_separates_what_the_lp_takes():
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(-1.0, 1.0, 40), "b": rng.normal(-0.5, 1.0, 30)}
    costs = {"a": 2.0, "b": 1.0}
    budget = 25.0
    t = knapsack_cut(scores, costs, budget)
    plan = select_neurons(scores, costs, budget, method="lp")
    for name, lam in scores.items():
        taken = np.zeros(lam.size, dtype=bool)
        taken[plan.get(name, torch.zeros(0, dtype=torch.long)).numpy()] = True
        margin = 0.05 * np.abs(lam).max()
        assert taken[lam < t[name] - margin].all() and not taken[lam > t[name] + margin].any(), name
        assert (t[name] <= 0).all()
    # a budget every candidate fits: the cut is the sign; a binding layer cap: the layer's own price
    assert all((v == 0).all() for v in knapsack_cut(scores, costs, 1e9).values())
    capped = knapsack_cut(scores, costs, 1e9, caps={"a": 3})
    order = np.sort(scores["a"])
    assert order[2] < capped["a"][0] < order[3] and (capped["b"] == 0).all()


def test_grow_records_adaptive_scoring_and_resumes_with_it(tmp_path):
    """--scoring adaptive and --split-candidates significant reach config.json, every growth stage records
    the images its scoring read and the neurons decided within their error bars, and the run resumes."""
    out = tmp_path / "grow"
    args = ["grow", "--cost", "flops", "--out", str(out), "--stages", "1", "--epochs", "1", "--limit", "400",
            "--batch-size", "16", "--scoring", "adaptive", "--scoring-cap", "0.5", "--scoring-min", "0.2",
            "--scoring-tolerance", "0.1", "--scoring-z", "1.5", "--split-candidates", "significant"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["scoring"], config["scoring_cap"], config["scoring_min"], config["scoring_tolerance"],
            config["scoring_z"], config["split_candidates"]) == ("adaptive", 0.5, 0.2, 0.1, 1.5, "significant")
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    if len(records) > 1:  # stage 1 split something
        rec = records[1]
        assert 0.2 * 400 <= rec["scoring_images"] <= 0.5 * 400 + 16
        assert rec["scoring"]["mode"] == "adaptive" and rec["scoring"]["stopped"] in ("tolerance", "cap")
        assert rec["scoring_decided"] + rec["scoring"]["undecided"] == rec["eigenvalues"]["count"]
        assert rec["scoring"]["significant_negative"] <= rec["eigenvalues"]["negative"]
    resumed = CliRunner().invoke(main, ["grow", "--resume", str(out), "--stages", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "config.json").read_text())["scoring"] == "adaptive"
    assert GrowConfig().scoring == "full" and GrowConfig().split_candidates == "all"
    with pytest.raises(ConfigError, match="scoring"):
        GrowConfig(scoring="adaptive", split_vectors=0)
    with pytest.raises(ConfigError, match="split_candidates"):
        GrowConfig(split_candidates="significant", split_method="exact")
    with pytest.raises(ConfigError, match="scoring_cap"):
        GrowConfig(scoring_cap=1.5)
    bad = CliRunner().invoke(main, ["grow", "--scoring", "half"])
    assert bad.exit_code == 2 and "--scoring" in bad.output


# ------------------------------------------------------------------------------------------------
# the Grower (issue 30) runs issue 31's scoring: grow and a user's loop alike
# ------------------------------------------------------------------------------------------------

def _mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)), torch.randn(2, 4)


def test_grower_scoring_options_are_validated_and_default_to_a_full_pass():
    model, x = _mlp()
    grower = Grower(model, x)
    assert (grower.scoring, grower.split_candidates) == ("full", "all") and grower.adaptive_scoring() is None
    bad = [({"scoring": "half"}, "scoring"), ({"split_candidates": "some"}, "split_candidates"),
           ({"scoring_tolerance": -1}, "scoring_tolerance"), ({"scoring_z": 0}, "scoring_z"),
           ({"scoring_min": 0}, "scoring_min"), ({"scoring_cap": 1.5}, "scoring_cap"),
           ({"scoring": "adaptive", "scoring_min": 0.5, "scoring_cap": 0.25}, "scoring_min"),
           ({"scoring": "adaptive", "split_vectors": 0}, "scoring"),
           ({"scoring": "adaptive", "split_epochs": 2}, "scoring"),
           ({"split_candidates": "significant", "split_method": "exact"}, "split_candidates")]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=f"^{field}:"):
            Grower(model, x, **kwargs)
    adaptive = Grower(model, x, scoring="adaptive", scoring_tolerance=0.1, scoring_z=1.5, scoring_min=0.2,
                      scoring_cap=0.5).adaptive_scoring(cut=None)
    assert (adaptive.tolerance, adaptive.z, adaptive.min_fraction, adaptive.max_fraction) == (0.1, 1.5, 0.2, 0.5)


def test_grower_prices_first_stops_on_the_knapsacks_cut_and_records_the_scoring(many_batches, monkeypatch):
    """An adaptive Grower step: the cut it scores against is knapsack_cut on the step's marginal costs, budget
    and caps (priced before scoring); the record says what scoring read and decided; with significant
    candidates every neuron split is below 0 beyond its error bar."""
    import hwsplit.run.grower as grower_module

    model, data = many_batches
    x = data[0][0]
    calls = []

    def spy(scores, costs, budget, *, caps=None):
        calls.append((dict(costs), budget, caps))
        return knapsack_cut(scores, costs, budget, caps=caps)

    monkeypatch.setattr(grower_module, "knapsack_cut", spy)
    grower = Grower(model, x[:1], cost="flops", growth_ratio=0.5, split_vectors=3, max_layer_growth=0.5,
                    scoring="adaptive", scoring_min=0.2, scoring_cap=0.5, scoring_tolerance=0.1, scoring_z=1.5,
                    split_candidates="significant")
    step = grower.grow_step(model, data)
    total = grower.cost_model.total(model, grower.input_shape)
    marginal = grower.cost_model.marginal(model, grower.input_shape, groups=step.groups)
    assert calls and all(budget == pytest.approx(0.5 * total) and caps == 0.5 for _, budget, caps in calls)
    assert all(costs == {k: marginal[k] for k in costs} for costs, _, _ in calls)
    first = next(iter(step.scores.values()))
    assert first.stopped in ("tolerance", "cap") and 0.2 * 1536 <= first.images <= 0.5 * 1536 + 16
    if step.record is None:  # nothing significant: the stop says so
        assert step.stop_reason is not None
        return
    rec = step.record
    assert rec["scoring_images"] == first.images and rec["scoring"]["mode"] == "adaptive"
    assert rec["scoring"]["z"] == 1.5 and rec["scoring"]["stopped"] == first.stopped
    assert rec["scoring_decided"] + rec["scoring"]["undecided"] == rec["eigenvalues"]["count"]
    assert rec["scoring"]["significant_negative"] <= rec["eigenvalues"]["negative"]
    assert rec["seconds"]["select_s"] >= 0
    for name, idx in step.plan.items():
        s = step.scores[name]
        assert bool((s.eigenvalues[idx] + 1.5 * s.stderr[idx] < 0).all()), name

    full = Grower(model, x[:1], cost="flops", split_vectors=3)
    full_step = full.grow_step(model, data)
    assert full_step.record["scoring_images"] == 1536 and full_step.record["scoring"]["stopped"] is None
    assert full_step.record["scoring"]["mode"] == "full"


def test_scoring_record_and_significant_scores_are_pure():
    lam = torch.tensor([-3.0, -1.0, -0.1, 0.5])
    se = torch.tensor([1.0, 1.0, 0.2, 0.1])
    score = SplitScore(lam.clone(), torch.eye(4), stderr=se, images=64, stopped="cap")
    kept = significant_scores({"a": score}, 2.0)["a"]
    assert kept.eigenvalues.tolist() == [-3.0, 0.0, 0.0, 0.0] and torch.equal(score.eigenvalues, lam)
    assert kept.eigenvectors is score.eigenvectors
    rec = scoring_record({"a": score}, lambda ev: {k: torch.full_like(v, -1.5) for k, v in ev.items()},
                         mode="adaptive", z=1.0)
    assert rec == {"mode": "adaptive", "images": 64, "stopped": "cap", "z": 1.0, "decided": 3, "undecided": 1,
                   "significant_negative": 1, "stderr_max": 1.0}
    with pytest.raises(ValueError, match="scores"):
        significant_scores({"a": SplitScore(lam, torch.eye(4))}, 2.0)


def test_make_grower_passes_the_scoring_fields_and_stage_records_keep_them():
    from types import SimpleNamespace

    import cost_models
    from hwsplit.run.grow import STEP_KEYS, make_grower

    model, _ = _mlp()
    config = GrowConfig(model="mlp", scoring="adaptive", scoring_tolerance=0.2, scoring_z=1.5, scoring_min=0.1,
                        scoring_cap=0.4, split_candidates="significant")
    session = SimpleNamespace(input_shape=(1, 4), device=torch.device("cpu"),
                              cost_model=cost_models.get_cost_model("flops"), channel_multiple=None)
    grower = make_grower(config, session, model)
    assert (grower.scoring, grower.scoring_tolerance, grower.scoring_z, grower.scoring_min, grower.scoring_cap,
            grower.split_candidates) == ("adaptive", 0.2, 1.5, 0.1, 0.4, "significant")
    assert {"scoring_images", "scoring_decided", "scoring"} <= set(STEP_KEYS)
