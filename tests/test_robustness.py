"""Failures keep the last good stage: non-finite losses, failed writes, Ctrl-C, crafted files, bad configs."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import hwsplit.run.grow
from cli import main
from hwsplit.network.checkpoint import load_checkpoint, save_checkpoint
from hwsplit.network.models import architecture, build_model

TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]


def _grow(out: Path, *extra: str):
    return CliRunner().invoke(main, ["grow", *TINY, *extra, "--out", str(out)])


def _records(run: Path) -> list[dict]:
    path = run / "stages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_only_stage_0_kept(out: Path, status: str) -> None:
    assert [r["stage"] for r in _records(out)] == [0]
    assert sorted(p.name for p in out.glob("stage-*.pt")) == ["stage-0.pt"]
    assert load_checkpoint(out / "stage-0.pt")["stage"] == 0  # intact
    assert not list(out.glob(".*.tmp"))
    assert status in (out / "summary.md").read_text()


def _fail_on_call(monkeypatch, target: str, n: int, error: BaseException) -> None:
    """Make ``<module>.<target>`` raise ``error`` on its n-th call (1-based); ``target`` is "module:name"."""
    module_name, target = target.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, target)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, target, wrapper)


# -- non-finite losses ----------------------------------------------------------------------------------

@pytest.mark.parametrize("target, n, message", [
    ("hwsplit.run.stages:train", 2, "training loss is nan at epoch 0, batch 3"),
    ("hwsplit.run.grower:splitting_indices", 1, "scoring: the loss is inf at batch 0"),  # Grower.grow_step scores
])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_stage(tmp_path, monkeypatch, target, n, message):
    _fail_on_call(monkeypatch, target, n, FloatingPointError(message))
    out = tmp_path / "run"
    result = _grow(out)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "stage 1 failed (non-finite loss)" in lines[0] and message in lines[0]
    assert "stages 0-0" in lines[0] and "Traceback" not in result.output
    _assert_only_stage_0_kept(out, f"failed in stage 1 (non-finite loss): {message}")


def test_a_real_divergence_in_the_seed_is_one_line(tmp_path):
    out = tmp_path / "run"
    result = _grow(out, "--lr", "1e9")
    assert result.exit_code == 1, result.output
    assert "stage 0 failed (non-finite loss)" in result.output and "no stage" in result.output
    assert "Traceback" not in result.output and not list(out.glob("stage-*.pt"))
    assert "Status: failed in stage 0" in (out / "summary.md").read_text()


# -- failed writes ------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("stage") == 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    result = _grow(out)
    assert result.exit_code == 1, result.output
    assert "stage 1 failed (write failed)" in result.output and "No space left on device" in result.output
    _assert_only_stage_0_kept(out, "failed in stage 1 (write failed)")


def test_a_refused_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "stage-1.pt"
    model = build_model("mlp", in_features=4, widths=[3], num_classes=2)
    save_checkpoint(path, model, stage=1)
    before = path.read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        save_checkpoint(path, build_model("mlp", in_features=4, widths=[5], num_classes=2), stage=1)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stage-1.pt"]


def test_records_file_write_failure_stops_the_run(tmp_path, monkeypatch):
    real = hwsplit.run.rundir.RunDir.write_records

    def write_records(self, records):
        if len(records) == 2:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(self, records)

    monkeypatch.setattr(hwsplit.run.rundir.RunDir, "write_records", write_records)
    out = tmp_path / "run"
    result = _grow(out)
    assert result.exit_code == 1 and "Read-only file system" in result.output, result.output
    assert [r["stage"] for r in _records(out)] == [0]
    # the orphan checkpoint of stage 1 is redone on resume: the run completes
    monkeypatch.setattr(hwsplit.run.rundir.RunDir, "write_records", real)
    result = CliRunner().invoke(main, ["grow", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["stage"] for r in _records(out)] == [0, 1, 2]


# -- Ctrl-C -------------------------------------------------------------------------------------------

def test_ctrl_c_while_writing_a_checkpoint_leaves_nothing_half_written(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("stage") == 1:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    result = _grow(out)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    _assert_only_stage_0_kept(out, "interrupted in stage 1")
    monkeypatch.setattr(torch, "save", real_save)
    result = CliRunner().invoke(main, ["grow", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["stage"] for r in _records(out)] == [0, 1, 2]


def test_ctrl_c_during_training(tmp_path, monkeypatch):
    _fail_on_call(monkeypatch, "hwsplit.run.stages:train", 2, KeyboardInterrupt())
    out = tmp_path / "run"
    result = _grow(out)
    assert result.exit_code == 130, result.output
    _assert_only_stage_0_kept(out, "interrupted in stage 1")


# -- crafted files and configurations that do not fit -------------------------------------------------

class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("command", ["export", "resume", "summary"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, command):
    run = tmp_path / "run"
    run.mkdir()
    pwned = tmp_path / "pwned"
    with open(run / "stage-0.pt", "wb") as f:
        pickle.dump({"format": "hwsplit.checkpoint/1", "stage": 0, "x": _Evil(pwned)}, f, protocol=2)
    (run / "stages.jsonl").write_text(json.dumps({"stage": 0, "architecture": {}}) + "\n")
    argv = {"export": ["export", str(run), "--onnx", str(tmp_path / "m.onnx")],
            "resume": ["grow", "--resume", str(run)],
            "summary": ["summary", str(run / "stage-0.pt")]}[command]
    if command == "resume":
        (run / "config.json").write_text(json.dumps(hwsplit.run.config.GrowConfig(stages=1).to_dict()))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "not a loadable hwsplit checkpoint" in result.output
    assert not pwned.exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg16"], "model: unknown name 'vgg16'"),
    (["--model", "mobilenet_v1", "--config", "foo"], "config: expected one of"),
    (["--model", "torchvision:mobilenet_v2", "--activation", "silu"], "does not take the option 'activation'"),
    (["--model", "mlp", "--config", "tiny_seed"], "mlp does not take the option 'config'"),
    (["--selection", "best"], "--selection"),
])
def test_models_that_do_not_exist_or_fit_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["grow", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3


def _checkpoint_with(tmp_path: Path, **arch_changes) -> Path:
    model = build_model("mobilenet_v1_cifar", widths=[8, 16], strides=[1, 2], stem_width=4)
    path = tmp_path / "stage-0.pt"
    save_checkpoint(path, model, stage=0, extra={"input_shape": [1, 3, 32, 32]})
    payload = load_checkpoint(path)
    payload["architecture"] = {**architecture(model), **arch_changes}
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"widths": [8, 16, 32]}, "widths: 3 widths for 2 strides"),
    ({"widths": [8, 24]}, "state_dict: does not fit the mobilenet_v1 architecture"),
    ({"family": "resnet"}, "family: unknown model family 'resnet'"),
    ({"widths": "8,16"}, "widths: expected a list"),
])
def test_checkpoints_whose_architecture_does_not_fit_are_one_line_errors(tmp_path, changes, message):
    path = _checkpoint_with(tmp_path, **changes)
    result = CliRunner().invoke(main, ["summary", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
