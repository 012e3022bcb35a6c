"""The CLI through click's CliRunner on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.training.data import load_dataset
from hwsplit.training.loaders import make_loaders

TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "grow"
    result = CliRunner().invoke(main, ["grow", "--cost", "flops", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    return out


def test_grow_writes_a_self_describing_run_directory(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "stages.jsonl", "summary.md", "stage-0.pt", "stage-1.pt", "stage-2.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["cost"] == "flops" and config["stages"] == 2 and config["split_vectors"] == 6
    records = [json.loads(line) for line in (tiny_run / "stages.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    for key in ("widths", "train_loss", "train_top1", "test_loss", "test_top1", "macs", "params", "cost",
                "seconds", "architecture"):
        assert key in records[1], key
    for key in ("split", "eigenvalues", "loss_before_split", "loss_after_split", "budget"):
        assert key in records[1], key
    assert set(records[1]["seconds"]) == {"train_s", "score_s", "select_s", "split_s"}
    assert records[2]["macs"] > records[1]["macs"] > records[0]["macs"]
    # the budget of a stage is half the cost of the network before it, and it is respected
    assert records[1]["budget"]["used"] <= 0.5 * records[0]["cost"]["value"] * (1 + 1e-9)
    assert records[1]["macs"] <= 1.5 * records[0]["macs"] * (1 + 1e-9)
    assert "| stage |" in (tiny_run / "summary.md").read_text()


def test_checkpoint_rebuilds_the_model_in_memory(tiny_run):
    payload = load_checkpoint(tiny_run / "stage-2.pt")
    assert payload["stage"] == 2
    model = load_model(tiny_run / "stage-2.pt")
    bundle = load_dataset("digits", limit=300)
    _, test = make_loaders(bundle, batch_size=64)
    x, _ = next(iter(test))
    records = [json.loads(line) for line in (tiny_run / "stages.jsonl").read_text().splitlines()]
    assert model.spec.to_dict() == records[2]["architecture"]
    # the same weights give the same outputs as a model built from the architecture and state dict
    from hwsplit.network.models import model_from_architecture

    again = model_from_architecture(payload["architecture"], payload["state_dict"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
    # and the test accuracy recorded is the accuracy of the checkpoint
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in test)
    assert correct / len(bundle.test) == pytest.approx(records[2]["test_top1"])


def test_summary_of_a_checkpoint_and_of_a_model_name(tiny_run):
    runner = CliRunner()
    result = runner.invoke(main, ["summary", str(tiny_run / "stage-2.pt")])
    assert result.exit_code == 0, result.output
    assert "blocks.0.pw.conv" in result.output and "MACs" in result.output
    result = runner.invoke(main, ["summary", "mobilenet_v1"])
    assert result.exit_code == 0, result.output
    assert "568,740,352 MACs" in result.output


@pytest.mark.parametrize("args, message", [
    (["grow", "--cost", "flops", "--budget", "4.5ms"], "does not match"),
    (["grow", "--cost", "lut"], "--profile"),
    (["grow", "--stages", "-1"], "--stages"),
    (["grow", "--cost", "watts"], "--cost"),
    (["grow", "--dataset", "npz", "--data-dir", "/nonexistent/hwsplit"], "/nonexistent/hwsplit"),
    (["grow", "--dataset", "imagenet"], "imagenet"),
    (["grow", "--model", "vgg"], "vgg"),
    (["grow", "--device", "tpu"], "--device"),
    (["grow", "--split-vectors", "-1"], "--split-vectors"),
    (["grow", "--budget", "lots"], "budget"),
    (["summary", "/nonexistent/stage-1.pt"], "does not exist"),
    (["fit", "/nonexistent/profile.json"], "profile.json"),
])
def test_bad_arguments_are_usage_errors(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_a_crafted_checkpoint_does_not_run_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "stage-0.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "hwsplit.checkpoint/1", "x": Evil()}, f, protocol=2)
    result = CliRunner().invoke(main, ["summary", str(path)])
    assert result.exit_code == 2
    assert not (tmp_path / "pwned").exists()


def test_test_limit_option(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["grow", "--stages", "0", "--epochs", "1", "--limit", "200", "--test-limit",
                                       "all", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["test_limit"] is None
    bad = CliRunner().invoke(main, ["grow", "--test-limit", "0"])
    assert bad.exit_code == 2 and "--test-limit" in bad.output


def test_split_vectors_reach_the_scorer(tmp_path, monkeypatch):
    """--split-vectors is the scoring cost/quality dial: it is the Rayleigh–Ritz subspace size of every
    stage's splitting_indices call, and a bad value in a config names its field."""
    import hwsplit.run.grower as grow_module  # a stage's scoring is Grower.grow_step's
    from hwsplit.infra.errors import ConfigError
    from hwsplit.run.config import GrowConfig

    seen = []
    real = grow_module.splitting_indices

    def spy(*args, **kwargs):
        seen.append((kwargs.get("ritz_vectors"), kwargs.get("ritz_allocation")))
        return real(*args, **kwargs)

    monkeypatch.setattr(grow_module, "splitting_indices", spy)
    out = tmp_path / "grow"
    result = CliRunner().invoke(main, ["grow", "--cost", "flops", "--out", str(out), "--split-vectors", "2",
                                       "--split-allocation", "uniform", "--stages", "1", "--epochs", "1",
                                       "--limit", "200", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert seen == [(2, "uniform")]
    config = json.loads((out / "config.json").read_text())
    assert config["split_vectors"] == 2 and config["split_allocation"] == "uniform"
    assert GrowConfig().split_allocation == "cost"
    with pytest.raises(ConfigError, match="split_vectors"):
        GrowConfig(split_vectors="3")
    with pytest.raises(ConfigError, match="split_allocation"):
        GrowConfig(split_allocation="even")
    bad = CliRunner().invoke(main, ["grow", "--split-allocation", "even"])
    assert bad.exit_code == 2 and "--split-allocation" in bad.output
