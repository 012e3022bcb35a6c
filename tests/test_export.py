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
from hwsplit.network.checkpoint import load_model
from hwsplit.run.export import ExportMismatchError, export_onnx, resolve_checkpoint


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


# ------------------------------------------------------------------------------------------------
# preprocessing: recorded everywhere, and baked into the graph on request (issue 29)
# ------------------------------------------------------------------------------------------------

def _pre_everywhere(run: Path) -> dict:
    """The preprocessing config.json records, checked to be the checkpoints' too."""
    import json

    from hwsplit.network.checkpoint import load_checkpoint

    pre = json.loads((run / "config.json").read_text())["preprocessing"]
    for ckpt in run.glob("stage-*.pt"):
        assert load_checkpoint(ckpt)["extra"]["preprocessing"] == pre
    return pre


def test_onnx_metadata_round_trips_the_preprocessing(tmp_path, run):
    import json

    from hwsplit.run.export import read_metadata
    from hwsplit.run.rundir import file_sha256
    from hwsplit.training.data import load_dataset

    pre = _pre_everywhere(run)
    bundle = load_dataset("digits", limit=300)
    assert pre["layout"] == "NCHW" and pre["dtype"] == "float32" and pre["value_range"] == [0.0, 1.0]
    assert pre["mean"] == pytest.approx(list(bundle.mean)) and pre["std"] == pytest.approx(list(bundle.std))
    assert pre["input_shape"] == [1, 8, 8]
    onnx_path = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(run), "--onnx", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "std" in result.output
    meta = read_metadata(onnx_path)
    assert json.loads(meta["hwsplit.preprocessing"]) == pre
    assert json.loads(meta["mean"]) == pre["mean"] and json.loads(meta["std"]) == pre["std"]
    assert meta["input_layout"] == "NCHW" and meta["preprocessing_baked_in"] == "false"
    assert meta["hwsplit.checkpoint_sha256"] == file_sha256(resolve_checkpoint(run))


def test_baked_in_preprocessing_matches_pytorch_on_raw_float_images(tmp_path, run):
    from hwsplit.run.export import read_metadata
    from hwsplit.training.data import load_dataset
    from hwsplit.training.loaders import make_loaders

    onnx_path = tmp_path / "raw.onnx"
    result = CliRunner().invoke(main, ["export", str(run), "--with-preprocessing", "--onnx", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert read_metadata(onnx_path)["preprocessing_baked_in"] == "true"
    bundle = load_dataset("digits", limit=300)
    raw = bundle.test.images[:16].numpy()  # what the data set stores: float 0..1, NCHW
    _, loader = make_loaders(bundle, batch_size=16)
    normalised, _ = next(iter(loader))  # what the network was trained on
    model = load_model(resolve_checkpoint(run))
    with torch.no_grad():
        expected = model(normalised).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": raw})
    assert np.abs(got - expected).max() < 1e-4


def test_baked_in_preprocessing_takes_uint8_images(tmp_path):
    from hwsplit.run.export import read_metadata
    from hwsplit.training.data import load_dataset
    from hwsplit.training.loaders import make_loaders

    data = tmp_path / "npz"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 32)):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 90, (n, 16, 16, 3)).astype(np.uint8)
        for c in range(3):
            x[y == c, :, :, c] += 150
        np.savez(data / f"{split}.npz", x=x, y=y)
    out = tmp_path / "g"
    result = CliRunner().invoke(main, ["grow", "--dataset", "npz", "--data-dir", str(data), "--stages", "0",
                                       "--epochs", "1", "--batch-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pre = _pre_everywhere(out)
    assert pre["dtype"] == "uint8" and pre["value_range"] == [0, 255] and len(pre["mean"]) == 3
    onnx_path = tmp_path / "u8.onnx"
    result = CliRunner().invoke(main, ["export", str(out), "--with-preprocessing", "--onnx", str(onnx_path)])
    assert result.exit_code == 0, result.output
    assert "uint8" in result.output and read_metadata(onnx_path)["input_dtype"] == "uint8"
    raw = np.load(data / "test.npz")["x"][:8].transpose(0, 3, 1, 2).copy()  # as stored, NCHW
    bundle = load_dataset("npz", data_dir=data)
    _, loader = make_loaders(bundle, batch_size=8)
    normalised, _ = next(iter(loader))
    with torch.no_grad():
        expected = load_model(out / "stage-0.pt")(normalised).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    (got,) = session.run(None, {"input": raw})
    assert np.abs(got - expected).max() < 1e-4


def test_with_preprocessing_needs_a_checkpoint_that_records_it(tmp_path, run):
    from hwsplit.network.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(resolve_checkpoint(run))
    old = tmp_path / "old.pt"
    save_checkpoint(old, load_model(resolve_checkpoint(run)), stage=1,
                    extra={"input_shape": payload["extra"]["input_shape"]})
    result = CliRunner().invoke(main, ["export", str(old), "--with-preprocessing", "--onnx", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "preprocessing" in result.output and "Traceback" not in result.output
