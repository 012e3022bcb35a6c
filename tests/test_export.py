"""`export`: a stage of a run to ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cli import main
from hwsplit.checkpoint import load_model
from hwsplit.export import ExportMismatchError, export_onnx, resolve_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "grow"
    result = CliRunner().invoke(main, ["grow", "--stages", "1", "--epochs", "1", "--limit", "300",
                                       "--batch-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_export_round_trip_through_onnxruntime(tmp_path, run):
    onnx_path = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", str(run), "--onnx", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "stage 1" in result.output  # the last stage by default
    diff = float(re.search(r"max \|difference\| = (\S+)", result.output).group(1))
    assert diff <= 1e-4
    # dynamic batch: a batch size the exporter never saw
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = load_model(run / "stage-1.pt")(x).numpy()
    assert got.shape == (7, 10)
    assert np.abs(got - want).max() <= 1e-4


def test_export_a_chosen_stage_and_a_checkpoint_file(tmp_path, run):
    assert resolve_checkpoint(run, 0) == run / "stage-0.pt"
    assert resolve_checkpoint(run / "stage-1.pt") == run / "stage-1.pt"
    info = export_onnx(run / "stage-0.pt", tmp_path / "s0.onnx")
    assert info["stage"] == 0 and info["input_shape"] == [1, 1, 8, 8] and info["max_abs_diff"] <= 1e-4
    assert (tmp_path / "s0.onnx").stat().st_size == info["bytes"]


def test_a_mismatch_writes_nothing(tmp_path, run):
    with pytest.raises(ExportMismatchError, match="differ"):
        export_onnx(run / "stage-1.pt", tmp_path / "bad.onnx", atol=-1.0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--stage", "7"], "stage-7.pt does not exist"),
    (["--onnx", "/nonexistent/dir/m.onnx"], "does not exist"),
])
def test_export_errors_are_one_line(tmp_path, run, args, message):
    argv = ["export", str(run), *args]
    if "--onnx" not in args:
        argv += ["--onnx", str(tmp_path / "m.onnx")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
