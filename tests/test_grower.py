"""hwsplit.Grower in a user's own loop (issue 30): the CLI's stage, the optimizer carried over,
untraceable models refused up front, the example, and the TensorBoard event files of every run."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from cli import main
from hwsplit import Grower, apply_split, splitting_indices
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.run.config import load_config
from hwsplit.run.grower import STOP_BUDGET, STOP_NO_NEGATIVE
from hwsplit.run.session import open_session, stage_seed
from hwsplit.run.tblog import RunBoard
from hwsplit.splitting.surgery import split_sources
from hwsplit.training.train import seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _invoke(*args: str) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A tiny grow run with a validation split and a final network, as the CLI writes it."""
    out = tmp_path_factory.mktemp("grower") / "grow"
    _invoke("grow", "--cost", "flops", *TINY, "--seed-epochs", "2", "--val-fraction", "0.2", "--final-epochs", "1",
            "--out", out)
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Grower.step is the CLI's stage
# ------------------------------------------------------------------------------------------------

def test_grower_step_on_the_trained_seed_is_the_clis_stage_1(cli_run):
    """From the CLI's stage-0 checkpoint, Grower.step on the same loader and seed gives stage 1's widths
    and split, and one stage of training of the grown model gives stage 1's weights, bit for bit."""
    config = load_config(cli_run)
    session = open_session(config)
    model = load_model(cli_run / "stage-0.pt")
    seed_everything(stage_seed(config, 1))
    session.train_loader.set_epoch(1 * 10_000 - 1)
    grower = Grower(model, torch.zeros(session.input_shape), cost="flops", growth_ratio=config.growth_ratio,
                    split_step=config.split_step, seed=config.seed)
    grown = grower.step(model, session.train_loader)

    want = _records(cli_run)[1]
    got = grower.records[0]
    assert grown is not model and not grower.stopped
    assert got["widths"] == want["widths"]
    assert got["split"] == want["split"] and got["neurons_split"] == want["neurons_split"] > 0
    assert got["eigenvalues"] == want["eigenvalues"]
    assert got["budget"] == {k: v for k, v in want["budget"].items()}
    assert got["cost_before"] == _records(cli_run)[0]["cost"]["value"] and got["cost_after"] == want["cost"]["value"]

    session.train_loader.set_epoch(1 * 10_000)
    train(grown, session.train_loader, config=config.stage_train_config(1))
    expected = load_checkpoint(cli_run / "stage-1.pt")["state_dict"]
    state = grown.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state), "stage 1 weights differ from the CLI's"


def test_step_splits_function_preservingly_and_stops_without_negative_indices(trained_tiny):
    model, data = trained_tiny
    model = copy.deepcopy(model)
    x = data[0][0]
    grower = Grower(model, x[:2], cost="none", growth_ratio=0.25, split_step=0.0, split_vectors=3)
    grown = grower.step(model, data)
    rec = grower.records[0]
    assert sum(rec["widths"].values()) - sum(rec["widths_before"].values()) == rec["neurons_split"] > 0
    assert rec["cost_after"] - rec["cost_before"] == rec["neurons_split"]  # "none": one per neuron
    assert rec["eigenvalues"]["negative"] > 0 and rec["eigenvalues"]["chosen_sum"] < 0
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)

    # no nonlinearity between a layer and its consumers: every splitting index is 0, nothing is split
    linear = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    flat = Grower(linear, loader[0][0], cost="flops")
    same = flat.step(linear, loader)
    assert same is linear and flat.stopped and flat.stop_reason == STOP_NO_NEGATIVE and flat.records == []
    assert flat.step(linear, loader) is linear  # once stopped, nothing more is split


def test_budget_stops_the_grower(trained_tiny):
    model, data = trained_tiny
    start = Grower(model, data[0][0][:1]).cost_model.total(model, (1, *data[0][0].shape[1:]))
    grower = Grower(model, data[0][0][:1], cost="flops", growth_ratio=1.0, split_vectors=3, budget=start * 1.05)
    grown = model
    for _ in range(10):
        grown = grower.step(grown, data)
        if grower.stopped:
            break
    assert grower.stopped and grower.stop_reason == STOP_BUDGET
    assert grower.records and grower.records[-1]["cost_after"] <= start * 1.05 * (1 + 1e-9)


# ------------------------------------------------------------------------------------------------
# the optimizer carried over
# ------------------------------------------------------------------------------------------------

def test_split_sources_say_where_every_entry_of_the_split_model_comes_from(trained_tiny):
    model, data = trained_tiny
    scores = splitting_indices(model, data, ritz_vectors=3)
    plan = {name: torch.tensor([0, 2]) for name in list(scores)[:3]}
    grown = apply_split(model, plan, scores, step=0.0)
    sources = split_sources(model, plan, scores)
    old, new = model.state_dict(), grown.state_dict()
    changed = {k for k in new if new[k].shape != old[k].shape}
    assert changed == set(sources)
    for name, index in sources.items():
        gathered = old[name]
        for dim, idx in enumerate(index):
            if idx is not None:
                gathered = gathered.index_select(dim, idx)
        ratio = new[name][gathered != 0] / gathered[gathered != 0]
        # equal, or halved (a consumer's columns of split channels)
        assert bool(((ratio - 1).abs() < 1e-6).logical_or((ratio - 0.5).abs() < 1e-6).all()), name


@pytest.mark.parametrize("offspring", ["parent", "fresh"])
def test_carry_optimizer_keeps_old_parameters_state(trained_tiny, offspring):
    model, data = trained_tiny
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for x, y in data[:2]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}

    grower = Grower(model, data[0][0][:1], cost="flops", split_vectors=3)
    grown = grower.step(model, data)
    sources = grower.last_step.sources
    assert grower.carry_optimizer(optimizer, model, grown, offspring=offspring) is optimizer

    params = dict(grown.named_parameters())
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in params.values()]
    assert not any(p in optimizer.state for p in model.parameters())
    grew = 0
    for name, p in params.items():
        state = optimizer.state[p]
        assert torch.equal(state["step"], before[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[name][key], state[key]
            assert new.shape == p.shape
            if name not in sources:
                assert torch.equal(new, old), name  # unchanged parameters keep their state as it is
                continue
            grew += 1
            keep = tuple(slice(0, n) for n in old.shape)
            assert torch.equal(new[keep], old), name  # every old entry keeps its state
            gathered = old
            offspring_entry = torch.zeros(p.shape, dtype=torch.bool)
            for dim, idx in enumerate(sources[name]):
                if idx is not None:
                    gathered = gathered.index_select(dim, idx)
                    shape = [1] * p.dim()
                    shape[dim] = -1
                    offspring_entry |= (torch.arange(p.shape[dim]) >= old.shape[dim]).view(shape)
            assert offspring_entry.any()
            if offspring == "parent":
                assert torch.equal(new, gathered), name  # offspring start from their parent's state
            else:  # offspring start from zeros, as in a new optimizer
                assert torch.equal(new, gathered.masked_fill(offspring_entry, 0)), name
    assert grew > 0
    optimizer.zero_grad()
    nn.functional.cross_entropy(grown(data[0][0]), data[0][1]).backward()
    optimizer.step()  # the carried optimizer trains the grown model
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_carry_optimizer_refuses_a_model_the_grower_did_not_make(trained_tiny):
    model, data = trained_tiny
    grower = Grower(model, data[0][0][:1], cost="flops")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="new_model"):
        grower.carry_optimizer(optimizer, model, copy.deepcopy(model))


# ------------------------------------------------------------------------------------------------
# models the tracer cannot read fail at construction
# ------------------------------------------------------------------------------------------------

class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc2(torch.relu(self.fc1(x)))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) + x)


def test_an_untraceable_or_unsplittable_model_fails_at_construction():
    with pytest.raises(ValueError, match=r"(?s)_Branchy cannot be traced by torch\.fx .*data-dependent control flow"):
        Grower(_Branchy(), torch.randn(2, 4))
    with pytest.raises(ValueError) as err:
        Grower(_Residual(), torch.randn(2, 4))
    message = str(err.value)
    assert "no layer of _Residual can be split" in message
    assert "fc1: its channels are tied by a residual add" in message and "fc2: its channels are outputs" in message
    with pytest.raises(ValueError, match="no Conv2d"):
        Grower(nn.Sequential(nn.Flatten()), torch.randn(2, 4))
    with pytest.raises(ValueError, match="cost: expected one of flops, none"):
        Grower(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(2, 4), cost="lut")
    with pytest.raises(ValueError, match="growth_ratio"):
        Grower(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(2, 4), growth_ratio=0)


def test_an_mlp_grows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(96, 6)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    grower = Grower(model, x[:1], cost="flops", split_vectors=3)
    assert grower.unsplittable(model) == {"4": "its channels are outputs of the model"}
    grown = grower.step(model, loader)
    assert grower.records and grown[0].out_features + grown[2].out_features > 16


# ------------------------------------------------------------------------------------------------
# the example
# ------------------------------------------------------------------------------------------------

def _load_example():
    path = ROOT / "examples" / "grow_your_own_loop.py"
    spec = importlib.util.spec_from_file_location("grow_your_own_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_grows_torchvision_mobilenet_v2_three_times(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                base = 60 if label == "a" else 190
                pixels = np.clip(rng.normal(base, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    records = _load_example().main(["--data", str(tmp_path / "images"), "--epochs", "1", "--rounds", "3",
                                     "--batch-size", "16", "--image-size", "16", "--width-mult", "0.25",
                                     "--logdir", str(tmp_path / "tb"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(records) == 3 and out.count("grew:") == 3
    costs = [records[0]["cost_before"]] + [r["cost_after"] for r in records]
    assert costs == sorted(costs) and costs[-1] > costs[0]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert events.Scalars("stage/neurons_split")[-1].step == 3 and events.Tags()["histograms"]


# ------------------------------------------------------------------------------------------------
# TensorBoard
# ------------------------------------------------------------------------------------------------

def _events(path: Path) -> EventAccumulator:
    return EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0}).Reload()


def _steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_event_files_hold_every_epoch_and_stage(cli_run):
    records = _records(cli_run)
    events = _events(cli_run / "tb")
    epochs = [r["schedule"]["epochs"] for r in records]
    assert epochs == [2, 1, 1]
    ends = list(np.cumsum(epochs))  # a stage's scalars sit at its last epoch
    for tag in ("train/loss", "train/top1", "train/lr"):
        assert _steps(events, tag) == list(range(1, sum(epochs) + 1)), tag
    for tag in ("test/loss", "test/top1", "val/loss", "val/top1", "stage/cost_MACs", "stage/macs", "stage/params",
                "stage/neurons_split", "stage/index"):
        assert _steps(events, tag) == ends, tag
    assert [e.value for e in events.Scalars("stage/index")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("test/top1")] == pytest.approx([r["test_top1"] for r in records])
    assert [e.value for e in events.Scalars("stage/cost_MACs")] == pytest.approx(
        [r["cost"]["value"] for r in records])
    assert [e.value for e in events.Scalars("stage/neurons_split")] == [r["neurons_split"] for r in records]
    for layer in records[0]["layers"]:
        assert [e.value for e in events.Scalars(f"widths/{layer}")] == [r["widths"][layer] for r in records]
    histograms = events.Tags()["histograms"]
    scored = records[1]["eigenvalues"]["per_layer_min"]
    assert {f"lambda/{k}" for k in scored} <= set(histograms)
    for layer, lowest in scored.items():
        stages = events.Histograms(f"lambda/{layer}")
        assert [h.step for h in stages] == ends[1:]
        assert stages[0].histogram_value.min == pytest.approx(lowest, rel=1e-5, abs=1e-9)
    # the final network (RUN/final/, a fine-tuning) has its own event files
    final = _events(cli_run / "final" / "tb")
    assert _steps(final, "train/loss") == [1] and _steps(final, "test/top1") == [1]


def test_baseline_and_no_tensorboard(tmp_path):
    _invoke("baseline", "width", "--multipliers", "0.5,1", "--epochs", "1", "--limit", "200", "--batch-size", "32",
            "--out", tmp_path / "width")
    events = _events(tmp_path / "width" / "tb")
    assert _steps(events, "train/loss") == [1, 2] and _steps(events, "test/top1") == [1, 2]
    _invoke("baseline", "width", "--multipliers", "1", "--epochs", "1", "--limit", "200", "--batch-size", "32",
            "--out", tmp_path / "width", "--overwrite")
    assert len(list((tmp_path / "width" / "tb").glob("events.out.tfevents.*"))) == 1  # the replaced run's are gone
    assert _steps(_events(tmp_path / "width" / "tb"), "test/top1") == [1]
    _invoke("grow", "--stages", "1", "--epochs", "1", "--limit", "200", "--batch-size", "32", "--no-tensorboard",
            "--out", tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "tb").exists()
    assert json.loads((tmp_path / "quiet" / "config.json").read_text())["tensorboard"] is False
    assert load_config(tmp_path / "quiet").tensorboard is False  # round-trips through --resume


def test_an_unwritable_tb_never_fails_a_run(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tb").write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="hwsplit.run.tblog"):
        _invoke("grow", "--stages", "1", "--epochs", "1", "--limit", "200", "--batch-size", "32", "--out", out)
    assert [r["stage"] for r in _records(out)] == [0, 1]
    assert any("TensorBoard: cannot write event files" in r.getMessage() for r in caplog.records)


def test_a_resumed_board_hides_what_the_interrupted_stage_wrote(tmp_path):
    first = RunBoard(tmp_path)
    for epoch in range(3):
        first.epoch({"epoch": epoch, "loss": 1.0, "top1": 0.5, "lr": 0.1})
    first.stage({"stage": 0, "schedule": {"epochs": 3}, "test_loss": 1.0, "test_top1": 0.5, "macs": 10, "params": 5,
                 "cost": {"unit": "ms", "value": 0.2}, "measured": {"latency_ms": {"median": 0.25}}})
    first.epoch({"epoch": 0, "loss": 9.0, "top1": 0.1, "lr": 0.1})  # the stage killed half-way
    first.close()
    time.sleep(1.1)  # event files sort by their names, which start with the second they were opened in
    resumed = RunBoard(tmp_path, epochs_done=3)
    for epoch in range(2):
        resumed.epoch({"epoch": epoch, "loss": 0.5, "top1": 0.9, "lr": 0.1})
    resumed.close()
    events = _events(tmp_path)
    assert _steps(events, "train/loss") == [1, 2, 3, 4, 5]
    assert [e.value for e in events.Scalars("train/loss")][3:] == [0.5, 0.5]
    assert _steps(events, "stage/latency_ms") == [3] and events.Scalars("stage/latency_ms")[0].value == 0.25
    assert _steps(events, "stage/cost_ms") == [3]
    time.sleep(1.1)
    again = RunBoard(tmp_path)  # a run that starts again from nothing hides every earlier event
    again.epoch({"epoch": 0, "loss": 2.0, "top1": 0.2, "lr": 0.1})
    again.close()
    events = _events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0)]
    assert all(not events.Scalars(tag) for tag in events.Tags()["scalars"] if not tag.startswith("train/"))


def test_a_stage_killed_mid_training_and_resumed_shows_every_epoch_once(tmp_path):
    """SIGKILL after stage 1's second epoch, then --resume (which continues from the training state):
    the event files show each epoch of the run once, the pre-kill epochs included."""
    import os
    import subprocess
    import sys

    from hwsplit.run.guard import KILL_AT_ENV

    out = tmp_path / "run"
    args = [sys.executable, "cli.py", "grow", "--stages", "2", "--epochs", "3", "--seed-epochs", "2", "--limit", "300",
            "--batch-size", "32", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", KILL_AT_ENV: "stage-1:epoch-1"}
    killed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode != 0 and [r["stage"] for r in _records(out)] == [0]
    time.sleep(1.1)  # the resumed run's event file must sort after the killed one's (names start with the second)
    env.pop(KILL_AT_ENV)
    resumed = subprocess.run([sys.executable, "cli.py", "grow", "--resume", str(out)], cwd=ROOT, env=env,
                             capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    events = _events(out / "tb")
    assert _steps(events, "train/loss") == list(range(1, 2 + 3 + 3 + 1))
    assert _steps(events, "test/top1") == [2, 5, 8]
