"""Baselines in the grow loop's record format: random selection and the width-multiplier sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from hwsplit.network.checkpoint import load_model
from hwsplit.run.baselines import parse_multipliers
from hwsplit.run.config import GrowConfig, stage_epochs_in_all
from hwsplit.splitting.select import random_selection

TINY = ["--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines()]


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def lp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lp") / "grow"
    _invoke("grow", *TINY, "--stages", "1", "--out", str(out))
    return out


# -- random selection: a pure function ---------------------------------------------------------------

def test_random_selection_is_seeded_and_fits_budget_and_caps():
    widths, costs = {"a": 10, "b": 20, "c": 5}, {"a": 3.0, "b": 1.0, "c": 7.0}
    plan = random_selection(widths, costs, 20.0, seed=[0, 1])
    again = random_selection(widths, costs, 20.0, seed=[0, 1])
    assert {k: v.tolist() for k, v in plan.items()} == {k: v.tolist() for k, v in again.items()}
    used = sum(costs[k] * len(v) for k, v in plan.items())
    assert 20.0 - min(costs.values()) < used <= 20.0  # it stops only when nothing else fits
    for k, v in plan.items():
        assert v.dtype == torch.long and v.unique().numel() == v.numel() and int(v.max()) < widths[k]
        assert torch.equal(v, v.sort().values)
    other = random_selection(widths, costs, 20.0, seed=[0, 2])
    assert {k: v.tolist() for k, v in other.items()} != {k: v.tolist() for k, v in plan.items()}
    # every neuron is equally likely: over many seeds each group is chosen in proportion to its size
    counts = {k: 0 for k in widths}
    for s in range(300):
        for k, v in random_selection(widths, {k: 1.0 for k in widths}, 7.0, seed=s).items():
            counts[k] += len(v)
    share = {k: counts[k] / (300 * 7) for k in widths}
    assert share["b"] == pytest.approx(20 / 35, abs=0.05) and share["c"] == pytest.approx(5 / 35, abs=0.04)
    capped = random_selection(widths, {k: 1.0 for k in widths}, 100.0, caps=0.2, seed=3)
    assert {k: len(v) for k, v in capped.items()} == {"a": 2, "b": 4, "c": 1}
    assert random_selection(widths, costs, 0.0, seed=0) == {}
    assert random_selection(widths, costs, 0.5, seed=0) == {}  # nothing is that cheap


@pytest.mark.parametrize("costs, message", [({"a": 1.0}, "no cost given for group 'b'"),
                                            ({"a": 1.0, "b": 0.0}, r"costs\['b'\]")])
def test_random_selection_names_bad_costs(costs, message):
    with pytest.raises(ValueError, match=message):
        random_selection({"a": 2, "b": 3}, costs, 1.0, seed=0)


def test_parse_multipliers_and_stage_epochs_in_all():
    assert parse_multipliers("0.25, 0.5,1") == [0.25, 0.5, 1.0]
    for bad in ("0.5,x", "0,1", "", "1,1"):
        with pytest.raises(ValueError, match="^multipliers:"):
            parse_multipliers(bad)
    assert stage_epochs_in_all(GrowConfig(stages=4, epochs=15), 4) == 75
    assert stage_epochs_in_all(GrowConfig(stages=2, epochs=3, seed_epochs=10), 2) == 16


# -- both baselines write the grow record format ------------------------------------------------------

def test_random_selection_run_has_the_grow_record_format(tmp_path, lp_run):
    out = tmp_path / "random"
    _invoke("grow", *TINY, "--stages", "1", "--selection", "random", "--out", str(out))
    lp, rnd = _records(lp_run), _records(out)
    assert [r["stage"] for r in rnd] == [0, 1]
    assert set(rnd[1]) == set(lp[1])
    assert rnd[1]["selection"] == "random" and lp[1]["selection"] == "lp"
    assert rnd[0]["architecture"] == lp[0]["architecture"]  # same seed network
    assert rnd[1]["budget"]["used"] <= rnd[1]["budget"]["value"] * (1 + 1e-9)
    assert rnd[1]["neurons_split"] > 0 and rnd[1]["macs"] > rnd[0]["macs"]
    assert json.loads((out / "config.json").read_text())["selection"] == "random"


def test_width_baseline_has_the_grow_record_format(tmp_path, lp_run):
    out = tmp_path / "width"
    output = _invoke("baseline", "width", "--multipliers", "0.5,1,2", *TINY, "--out", str(out))
    assert "width ×" in output
    records, seed = _records(out), _records(lp_run)[0]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert [r["width_mult"] for r in records] == [0.5, 1.0, 2.0]
    assert set(seed) <= set(records[0]) and set(records[0]) - set(seed) == {"width_mult", "epochs"}
    assert all(r["epochs"] == 1 for r in records)
    # ×1 is the seed grow starts from; the others scale every layer
    assert records[1]["architecture"] == seed["architecture"]
    assert records[2]["widths"] == {k: 2 * v for k, v in seed["widths"].items()}
    assert records[0]["macs"] < records[1]["macs"] < records[2]["macs"]
    config = json.loads((out / "config.json").read_text())
    assert config["baseline"] == "width" and config["multipliers"] == [0.5, 1.0, 2.0] and config["total_epochs"] == 1
    for r in records:
        assert load_model(out / f"stage-{r['stage']}.pt").spec.to_dict() == r["architecture"]
    assert "| width × |" in (out / "summary.md").read_text() and "Status: done" in (out / "summary.md").read_text()


def test_width_baseline_like_a_run_trains_as_long_as_the_run(tmp_path, lp_run):
    out = tmp_path / "like"
    _invoke("baseline", "width", "--like", str(lp_run), "--multipliers", "1", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["total_epochs"] == 2  # seed epoch + 1 stage × 1 epoch
    assert config["data_limit"] == 300 and config["batch_size"] == 32
    record = _records(out)[0]
    assert record["epochs"] == 2 and record["architecture"] == _records(lp_run)[0]["architecture"]


def test_width_baseline_bad_multipliers_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["baseline", "width", "--multipliers", "0.5,big", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "multipliers" in result.output and "Traceback" not in result.output
