"""Fine-tuning and retraining grown stages, the validation split, post-split policies and the final network."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from hwsplit.infra.errors import ConfigError
from hwsplit.network.checkpoint import load_checkpoint
from hwsplit.run.config import GrowConfig
from hwsplit.run.finetune import ship_stage
from hwsplit.run.guard import KILL_AT_ENV
from hwsplit.training.bundle import split_validation
from hwsplit.training.data import load_dataset
from hwsplit.training.schedule import WARM_LR_FACTOR, WARMUP_FRACTION, stage_train_config
from hwsplit.training.train import TrainConfig, make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines() if line.strip()]


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "grow"
    _cli("grow", *TINY, "--val-fraction", "0.2", "--out", str(out))
    return out


# ------------------------------------------------------------------------------------------------
# validation split
# ------------------------------------------------------------------------------------------------

def test_validation_split_never_overlaps_training_and_is_seeded():
    bundle = load_dataset("digits", limit=500, seed=0)
    a = split_validation(bundle, 0.2, seed=3)
    assert len(a.val) == 100 and len(a.train) == 400
    tr, va = set(a.train_index.tolist()), set(a.val_index.tolist())
    assert not tr & va and tr | va == set(range(500))
    # the images themselves are the original ones at those indices, so no image is in both
    torch.testing.assert_close(a.train.images, bundle.train.images[a.train_index], rtol=0, atol=0)
    torch.testing.assert_close(a.val.images, bundle.train.images[a.val_index], rtol=0, atol=0)
    assert a.val.augment is False
    again, other = split_validation(bundle, 0.2, seed=3), split_validation(bundle, 0.2, seed=4)
    assert torch.equal(again.val_index, a.val_index) and not torch.equal(other.val_index, a.val_index)
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(bundle, 1.0, seed=0)


def test_grow_records_validation_accuracy_on_the_carved_images(grown):
    config = json.loads((grown / "config.json").read_text())
    assert config["val_fraction"] == 0.2 and config["post_split"] == "restart"
    for r in _records(grown):
        assert r["val_samples"] == 60 and r["test_samples"] == 60  # 300 training images: 240 + 60, test 300 // 5
        assert 0 <= r["val_top1"] <= 1 and math.isfinite(r["val_loss"])
        assert round(r["val_top1"] * 60) == pytest.approx(r["val_top1"] * 60, abs=1e-6)


def test_config_refuses_bad_policy_and_fraction():
    with pytest.raises(ConfigError, match="post_split"):
        GrowConfig(post_split="sometimes")
    with pytest.raises(ConfigError, match="val_fraction"):
        GrowConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="final_epochs"):
        GrowConfig(final_epochs=0)


# ------------------------------------------------------------------------------------------------
# post-split policies
# ------------------------------------------------------------------------------------------------

def _lrs(config: TrainConfig, steps_per_epoch: int = 4) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config, steps_per_epoch)
    out = []
    for _ in range(config.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_restart_warm_and_continue_schedules():
    base = TrainConfig(epochs=99, lr=0.1)
    kw = {"seed_epochs": 4, "stage_epochs": 2, "stages": 3}
    restart = stage_train_config(base, "restart", 2, **kw)
    assert (restart.epochs, restart.lr, restart.warmup_epochs) == (2, 0.1, 0.0)
    warm = stage_train_config(base, "warm", 1, **kw)
    assert warm.lr == pytest.approx(0.1 * WARM_LR_FACTOR) and warm.warmup_epochs == pytest.approx(2 * WARMUP_FRACTION)
    assert stage_train_config(base, "warm", 0, **kw).lr == 0.1  # the seed trains as before
    lrs = _lrs(warm)
    assert lrs[0] < lrs[1] and max(lrs) <= 0.1 * WARM_LR_FACTOR + 1e-12  # warm-up, then never above the peak
    # continue: the stages' segments join into one cosine over 4 + 3 × 2 = 10 epochs
    segments = [_lrs(stage_train_config(base, "continue", k, **kw)) for k in range(4)]
    joined = [x for s in segments for x in s]
    whole = _lrs(TrainConfig(epochs=10, lr=0.1))
    assert joined == pytest.approx(whole, abs=1e-12)


def test_grow_applies_the_policy(tmp_path):
    out = tmp_path / "warm"
    _cli("grow", "--stages", "1", "--epochs", "2", "--limit", "200", "--post-split", "warm", "--out", str(out))
    seed, stage1 = _records(out)
    assert seed["schedule"]["lr"] == 0.1 and seed["schedule"]["warmup_epochs"] == 0
    assert stage1["schedule"]["lr"] == pytest.approx(0.1 * WARM_LR_FACTOR)
    assert stage1["schedule"]["warmup_epochs"] == pytest.approx(2 * WARMUP_FRACTION)


# ------------------------------------------------------------------------------------------------
# finetune / retrain
# ------------------------------------------------------------------------------------------------

def test_finetune_and_retrain_every_stage(grown):
    _cli("finetune", str(grown), "--all", "--epochs", "2")
    _cli("finetune", str(grown), "--stage", "1", "--stage", "2", "--epochs", "2", "--from-scratch")
    source = _records(grown)
    ft, rt = _records(grown / "finetune"), _records(grown / "retrain")
    assert [r["source_stage"] for r in ft] == [0, 1, 2] and [r["source_stage"] for r in rt] == [1, 2]
    assert [r["epochs_in_all"] for r in ft] == [3, 4, 5]  # seed 1 epoch + k × 1, then 2 more
    assert [r["epochs_in_all"] for r in rt] == [2, 2]
    for r in ft + rt:
        s = source[r["source_stage"]]
        assert r["architecture"] == s["architecture"] and r["macs"] == s["macs"] and r["cost"] == s["cost"]
        assert "val_top1" in r and r["test_samples"] == 60 and r["stage"] == (ft if r in ft else rt).index(r)
    config = json.loads((grown / "retrain" / "config.json").read_text())
    assert config["finetune"]["from_scratch"] is True and config["finetune"]["stages"] == [1, 2]
    # fine-tuning continues from the grown weights; retraining does not
    for sub, k, same in (("finetune", 2, True), ("retrain", 1, False)):
        before = load_checkpoint(grown / f"stage-{k}.pt")["state_dict"]
        i = [r["source_stage"] for r in _records(grown / sub)].index(k)
        after = load_checkpoint(grown / sub / f"stage-{i}.pt")["state_dict"]
        key = next(n for n, t in before.items() if t.ndim == 4)
        gap = float((after[key] - before[key]).abs().max())
        assert (gap < 0.5) if same else (gap > 0.05), (sub, gap)
    # the same command again is a no-op; another one into the same directory needs --overwrite
    _cli("finetune", str(grown), "--all", "--epochs", "2")
    assert _records(grown / "finetune") == ft
    result = CliRunner().invoke(main, ["finetune", str(grown), "--all", "--epochs", "3"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = CliRunner().invoke(main, ["finetune", str(grown), "--stage", "7", "--epochs", "1"])
    assert result.exit_code == 2 and "stage" in result.output


def _spawn(run: Path, out: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return subprocess.run([sys.executable, "cli.py", "finetune", str(run), "--all", "--epochs", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, timeout=300)


def test_finetune_resumes_after_a_kill(grown, tmp_path):
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    assert _spawn(grown, reference, None).returncode == 0
    first = _spawn(grown, killed, "finetune-1:start")
    assert first.returncode != 0 and len(_records(killed)) == 1
    assert _spawn(grown, killed, None).returncode == 0
    got, want = _records(killed), _records(reference)
    assert [r["source_stage"] for r in got] == [0, 1, 2]
    for a, b in zip(got, want):
        assert a["test_top1"] == b["test_top1"] and a["val_top1"] == b["val_top1"]
        x = load_checkpoint(killed / f"stage-{a['stage']}.pt")["state_dict"]
        y = load_checkpoint(reference / f"stage-{a['stage']}.pt")["state_dict"]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not list(killed.glob(".*.tmp"))


@pytest.fixture(scope="module")
def rgb32(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 40)):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
        for c in range(4):
            x[y == c, :, :, c % 3] += 120
        np.savez(root / f"{split}.npz", x=x, y=y)
    return root


def test_finetune_and_retrain_a_torchvision_mobilenet_v2(tmp_path, rgb32):
    import torchvision

    from hwsplit.network.checkpoint import load_model

    out = tmp_path / "tv"
    _cli("grow", "--model", "torchvision:mobilenet_v2", "--width-mult", "0.25", "--dataset", "npz", "--data-dir",
         str(rgb32), "--stages", "1", "--epochs", "1", "--batch-size", "32", "--val-fraction", "0.25",
         "--out", str(out))
    _cli("finetune", str(out), "--stage", "1", "--epochs", "1")
    _cli("finetune", str(out), "--stage", "1", "--epochs", "1", "--from-scratch")
    grown = _records(out)[1]
    for sub in ("finetune", "retrain"):
        (r,) = _records(out / sub)
        assert r["architecture"] == grown["architecture"] and r["val_samples"] == 40
        assert isinstance(load_model(out / sub / "stage-0.pt"), torchvision.models.MobileNetV2)


# ------------------------------------------------------------------------------------------------
# final network, report
# ------------------------------------------------------------------------------------------------

def test_ship_stage_chooses_on_validation_within_the_budget():
    recs = [{"stage": k, "val_top1": v, "test_top1": t, "cost": {"value": c}}
            for k, (v, t, c) in enumerate([(0.5, 0.9, 1.0), (0.7, 0.1, 2.0), (0.7, 0.2, 3.0), (0.9, 0.3, 5.0)])]
    assert ship_stage(GrowConfig(), recs)[0] == 3  # no budget: the last stage
    assert ship_stage(GrowConfig(budget=4.0), recs)[0] == 1  # best val within 4, earliest of the tie; not test
    no_val = [{k: v for k, v in r.items() if k != "val_top1"} for r in recs]
    assert ship_stage(GrowConfig(budget=4.0), no_val)[0] == 3


def test_grow_final_epochs_and_report_with_derived_runs(tmp_path):
    from hwsplit.run.report import write_report

    out = tmp_path / "g"
    text = _cli("grow", "--stages", "1", "--epochs", "1", "--limit", "200", "--final-epochs", "2", "--out", str(out))
    (final,) = _records(out / "final")
    seed = _records(out)[0]
    assert final["source_stage"] == 1 and final["epochs_in_all"] == 4
    assert f"test top-1 {final['test_top1']:.4f}" in text and f"seed: {seed['test_top1']:.4f}" in text
    _cli("finetune", str(out), "--stage", "1", "--epochs", "1", "--from-scratch")
    result = write_report([out], tmp_path / "report")
    names = [row[0] for row in result["rows"][1:]]
    assert names == ["g", "g", "final", "retrain"]
    header = result["rows"][0]
    final_row = result["rows"][3]
    p, n = final["test_top1"], final["test_samples"]
    assert final_row[header.index("± 2 SE")] == f"{200 * math.sqrt(p * (1 - p) / n):.2f}"
    assert final_row[header.index("epochs in all")] == "4"
    assert (tmp_path / "report" / "accuracy_vs_macs.png").stat().st_size > 1000


def test_grow_final_init_fresh_retrains_the_shipped_architecture(tmp_path):
    """--final-init fresh: the shipped network is the grown architecture re-initialised and trained --final-epochs."""
    out = tmp_path / "g"
    text = _cli("grow", "--stages", "1", "--epochs", "1", "--limit", "200", "--final-epochs", "2", "--final-init",
                "fresh", "--out", str(out))
    (final,) = _records(out / "final")
    grown = _records(out)[1]
    assert final["from_scratch"] is True and final["epochs_in_all"] == 2 and final["source_stage"] == 1
    assert final["architecture"] == grown["architecture"]
    assert "retrained from a fresh initialisation 2 epochs" in text
    assert json.loads((out / "config.json").read_text())["final_init"] == "fresh"
    a = load_checkpoint(out / "final" / "stage-0.pt")["state_dict"]
    b = load_checkpoint(out / "stage-1.pt")["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="final_init"):
        GrowConfig(final_init="warm")
