"""The pruning baseline (hwsplit.run.prune, `baseline prune`): targets hit, models hwsplit understands, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import batches, synthetic_data, train_briefly

import cost_models
from cli import main
from hwsplit.infra.errors import ConfigError
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.network.models import architecture, build_model, model_from_architecture
from hwsplit.run.guard import KILL_AT_ENV
from hwsplit.run.prune import TOLERANCE, prune_to_cost, slimming_loss

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]
PRUNE = ["--train-epochs", "1", "--finetune-epochs", "1"]
SHAPE = (1, 3, 32, 32)


def _records(run: Path) -> list[dict]:
    path = run / "stages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained_cifar() -> tuple[torch.nn.Module, list]:
    """MobileNetV1-CIFAR (the paper's seed layout at width ×1.5, 4 classes) trained briefly on 128 images."""
    torch.manual_seed(0)
    x, y = synthetic_data(128, resolution=32, classes=4)
    data = batches(x, y, 32)
    model = build_model("mobilenet_v1_cifar", width_mult=1.5, num_classes=4)
    return train_briefly(model, data, epochs=2), data


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune") / "grow"
    _cli("grow", *TINY, "--val-fraction", "0.2", "--out", str(out))
    return out


def _check_mobilenet(model: torch.nn.Module) -> None:
    """Every depthwise conv has the channels of the pointwise producer before it (pruned together)."""
    prev = model.stem.conv.out_channels
    for block in model.blocks:
        dw = block.dw.conv
        assert dw.in_channels == dw.out_channels == dw.groups == prev == block.dw.bn.num_features
        assert block.pw.conv.in_channels == prev
        prev = block.pw.conv.out_channels
    assert model.classifier.in_features == prev and model.classifier.out_features == 4


@pytest.mark.parametrize("method", ["l1", "slimming", "taylor"])
def test_pruning_lands_within_2_percent_at_or_under_a_macs_target(trained_cifar, method):
    model, data = trained_cifar
    flops = cost_models.get_cost_model("flops")
    cost = lambda m: flops.total(m, SHAPE)  # noqa: E731
    wide = cost(model)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for share in (0.6, 0.25):
        target = share * wide
        pruned, info = prune_to_cost(model, target, cost, method=method, example=torch.zeros(SHAPE), batches=data[:2])
        got = cost(pruned)
        assert (1 - TOLERANCE) * target <= got <= target, (method, share, got / target)
        assert info["cost"] == got and info["within_tolerance"] and info["steps"] >= 1
        if method == "taylor":  # one gradient pass per step, one more for a last fit
            assert info["gradient_samples"] in (info["steps"] * 64, (info["steps"] + 1) * 64)
        else:
            assert info["gradient_samples"] == 0
        _check_mobilenet(pruned)
        # a model hwsplit understands: its architecture rebuilds it with the same weights and outputs
        rebuilt = model_from_architecture(architecture(pruned), pruned.state_dict()).eval()
        x = data[0][0]
        with torch.no_grad():
            out = pruned.eval()(x)
            assert torch.isfinite(out).all() and torch.equal(out, rebuilt(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())  # the wide model is untouched


def test_pruning_rounds_to_the_channel_multiple(trained_cifar):
    model, data = trained_cifar
    flops = cost_models.get_cost_model("flops")
    cost = lambda m: flops.total(m, SHAPE)  # noqa: E731
    target = 0.4 * cost(model)
    pruned, info = prune_to_cost(model, target, cost, method="l1", example=torch.zeros(SHAPE), round_to=4)
    arch = architecture(pruned)
    assert arch["stem_width"] % 4 == 0 and all(w % 4 == 0 for w in arch["widths"]), arch
    assert cost(pruned) <= target and info["within_tolerance"] == (cost(pruned) >= (1 - TOLERANCE) * target)


def test_pruning_below_every_layer_at_one_channel_is_an_error(trained_cifar):
    model, _ = trained_cifar
    flops = cost_models.get_cost_model("flops")
    with pytest.raises(ConfigError, match="^targets: "):
        prune_to_cost(model, 10.0, lambda m: flops.total(m, SHAPE), method="l1", example=torch.zeros(SHAPE))


def test_slimming_loss_is_cross_entropy_plus_l1_on_batchnorm_scales():
    torch.manual_seed(0)
    model = build_model("mobilenet_v1_cifar", width_mult=0.5, num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    scales = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    loss = slimming_loss(model, 1e-3)(logits, y)
    torch.testing.assert_close(loss, ce + 1e-3 * sum(s.abs().sum() for s in scales))
    loss.backward()
    g_pen = scales[0].grad.clone()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(g_pen - scales[0].grad, 1e-3 * torch.sign(scales[0].detach()))


# ------------------------------------------------------------------------------------------------
# the command: run directory, report, export, summary, finetune, resume, errors
# ------------------------------------------------------------------------------------------------

def test_prune_command_writes_a_run_that_every_command_takes(grown, tmp_path):
    out = tmp_path / "prune"
    _cli("baseline", "prune", "--like", str(grown), "--method", "taylor", *PRUNE, "--from-scratch", "--out", str(out))
    source, records = _records(grown), _records(out)
    config = json.loads((out / "config.json").read_text())
    assert config["baseline"] == "prune" and config["prune"]["method"] == "taylor"
    assert config["prune"]["targets"] == [r["cost"]["value"] for r in source]
    wide, pruned = records[0], records[1:]
    assert wide["stage"] == 0 and wide["epochs"] == wide["epochs_in_all"] == 1
    for name, width in wide["widths"].items():  # wider than every grown stage in every layer
        assert all(width >= r["widths"][name] for r in source)
    n_train = wide["train_samples_in_all"]
    assert n_train == 240  # 300 images, 20 % of them validation
    for r, s in zip(pruned, source):
        for key in ("stage", "macs", "params", "cost", "widths", "architecture", "test_top1", "val_top1", "epochs",
                    "epochs_in_all", "target_cost", "pruned_top1_before_finetune", "method", "wide_width_mult"):
            assert key in r, key
        assert r["target_cost"] == s["cost"]["value"] and r["target_stage"] == s["stage"]
        assert r["cost"]["value"] <= r["target_cost"]
        assert r["within_tolerance"] == (r["cost"]["value"] >= (1 - TOLERANCE) * r["target_cost"])
        assert 0 <= r["pruned_top1_before_finetune"] <= 1 and r["epochs"] == 1 and r["epochs_in_all"] == 2
        assert r["train_samples_in_all"] == 2 * n_train + r["search_train_samples"] - n_train
        assert r["search_train_samples"] > n_train  # the Taylor gradients' passes count too
        model = load_model(out / f"stage-{r['stage']}.pt")
        assert architecture(model) == r["architecture"]
    assert any(r["within_tolerance"] for r in pruned)
    # retrained from scratch: the wide network's training counts, fresh weights
    retrain = _records(out / "retrain")
    assert [r["source_stage"] for r in retrain] == [r["stage"] for r in pruned]
    for r, p in zip(retrain, pruned):
        assert r["architecture"] == p["architecture"] and r["epochs_in_all"] == 2 and r["from_scratch"]
        assert r["train_samples_in_all"] == p["search_train_samples"] + n_train
    # report, export, summary and finetune take it like any other run
    report = _cli("report", str(grown), str(out), str(out / "retrain"), "--out", str(tmp_path / "report"))
    assert "prune" in (tmp_path / "report" / "table.md").read_text() and "wrote" in report
    assert (tmp_path / "report" / "accuracy_vs_macs.png").is_file()
    _cli("export", str(out), "--stage", "1", "--onnx", str(tmp_path / "p.onnx"))
    assert (tmp_path / "p.onnx").stat().st_size > 0
    summary = _cli("summary", str(out / "stage-1.pt"))
    assert f"{int(pruned[0]['macs']):,} MACs" in summary
    _cli("finetune", str(out), "--stage", "1", "--epochs", "1")
    ft = _records(out / "finetune")
    assert ft[0]["epochs_in_all"] == 3 and ft[0]["architecture"] == pruned[0]["architecture"]
    # the same command again continues (nothing to do); another one needs --overwrite
    _cli("baseline", "prune", "--like", str(grown), "--method", "taylor", *PRUNE, "--out", str(out))
    assert _records(out) == records
    result = CliRunner().invoke(main, ["baseline", "prune", "--like", str(grown), "--method", "l1", *PRUNE,
                                       "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output


@pytest.mark.parametrize("args, field", [(["--targets", "10"], "targets"), (["--targets", "1G"], "targets"),
                                         (["--targets", "3ms"], "targets"),
                                         (["--slimming-l1", "1e-3"], "--slimming-l1")])
def test_bad_targets_are_one_line_and_exit_2(grown, tmp_path, args, field):
    result = CliRunner().invoke(main, ["baseline", "prune", "--like", str(grown), "--method", "l1", *PRUNE, *args,
                                       "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and field in result.output
    assert not (tmp_path / "p").exists()  # refused before anything is written


def _spawn(run: Path, out: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    costs = [r["cost"]["value"] for r in _records(run)]  # two targets: the seed's and the last stage's
    return subprocess.run([sys.executable, "cli.py", "baseline", "prune", "--like", str(run), "--method", "slimming",
                           *PRUNE, "--targets", f"{costs[0]:.0f},{costs[-1]:.0f}", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def reference(grown, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune-ref") / "ref"
    assert _spawn(grown, out, None).returncode == 0
    return out


@pytest.mark.parametrize("kill_at", ["stage-0:checkpoint", "prune-2:start"])
def test_prune_resumes_after_a_kill(grown, reference, tmp_path, kill_at):
    killed = tmp_path / "killed"
    first = _spawn(grown, killed, kill_at)
    assert first.returncode != 0
    assert len(_records(killed)) == (0 if kill_at.startswith("stage-0") else 2)
    second = _spawn(grown, killed, None)
    assert second.returncode == 0, second.stderr.decode()
    got, want = _records(killed), _records(reference)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        a, b = dict(a), dict(b)
        assert a.pop("seconds").keys() == b.pop("seconds").keys()
        assert a == b
        x = load_checkpoint(killed / f"stage-{a['stage']}.pt")["state_dict"]
        y = load_checkpoint(reference / f"stage-{a['stage']}.pt")["state_dict"]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not list(killed.glob(".*.tmp"))


def test_a_locked_output_is_refused(grown, tmp_path):
    from hwsplit.run.rundir import RunDir

    out = tmp_path / "locked"
    with RunDir(out).lock("test"):
        result = CliRunner().invoke(main, ["baseline", "prune", "--like", str(grown), "--method", "l1", *PRUNE,
                                           "--out", str(out)])
    assert result.exit_code == 2 and "in use" in result.output, result.output
    assert not (out / "config.json").exists()


def test_max_pruning_ratio_keeps_every_layer_above_its_floor(trained_cifar):
    from hwsplit.run.prune import layer_floor

    model, _ = trained_cifar
    flops = cost_models.get_cost_model("flops")
    cost = lambda m: flops.total(m, SHAPE)  # noqa: E731
    target = 0.3 * cost(model)
    pruned, _ = prune_to_cost(model, target, cost, method="l1", example=torch.zeros(SHAPE), max_pruning_ratio=0.7)
    wide, got = architecture(model), architecture(pruned)
    assert cost(pruned) <= target
    for w, g in zip([wide["stem_width"], *wide["widths"]], [got["stem_width"], *got["widths"]]):
        assert g >= layer_floor(w, 0.7, 1) >= 0.3 * w, (w, g)


def test_an_oversized_default_wide_network_is_said_and_a_given_width_is_not(grown, tmp_path, caplog):
    """The default wide network (every layer as wide as every grown stage's) can cost many times the largest
    target when growth concentrates in a few layers: a warning names --width-mult; a given width says nothing."""
    from hwsplit.run.prune import prune_baseline

    for width_mult in (None, 2.0):
        caplog.clear()
        with caplog.at_level("WARNING", logger="hwsplit.run.prune"), pytest.raises(ConfigError, match="targets"):
            # a target below what pruning can reach: refused after the wide network is sized, before training
            prune_baseline(grown, method="l1", targets=[1.0], width_mult=width_mult, out=tmp_path / "p")
        warned = [r.getMessage() for r in caplog.records if "--width-mult" in r.getMessage()]
        assert bool(warned) == (width_mult is None), warned
        assert not (tmp_path / "p").exists()
