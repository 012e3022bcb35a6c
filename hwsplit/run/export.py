"""Export a stage of a run to ONNX and check it against PyTorch with onnxruntime.

The checkpoint is rebuilt with :func:`hwsplit.network.checkpoint.load_model` (weights only, no pickle),
exported with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``; the
``torch.export`` one needs onnxscript) with a dynamic batch axis, and run in an onnxruntime CPU
session on random inputs of several batch sizes. The file is written (atomically) only when the
outputs agree with PyTorch's within the tolerance.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from hwsplit.infra.errors import RunFailed
from hwsplit.infra.fsio import atomic_write, check_writable_name
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.run.rundir import RunDir, check_source, file_sha256, record_export

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportMismatchError(RunFailed):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance (nothing is written)."""


def resolve_checkpoint(run_or_checkpoint: str | Path, stage: int | None = None) -> Path:
    """The ``stage-K.pt`` of a run directory (default: its last completed stage), or a checkpoint path.

    ``ValueError`` naming the path when there is no such run, stage or file.
    """
    path = Path(run_or_checkpoint)
    if path.is_file():
        if stage is not None:
            raise ValueError(f"stage: {path} is a checkpoint file; --stage selects a stage of a run directory")
        return path
    if not path.is_dir():
        raise ValueError(f"run: {path} does not exist")
    run = RunDir(path)
    records = run.records()
    if stage is None:
        if records:
            stage = records[-1]["stage"]
        elif run.checkpoints():
            stage = max(run.checkpoints())
        else:
            raise ValueError(f"run: {path} has no completed stage (no stages.jsonl records, no stage-K.pt)")
    checkpoint = run.checkpoint(stage)
    if not checkpoint.is_file():
        have = ", ".join(str(k) for k in run.checkpoints()) or "none"
        raise ValueError(f"stage: {checkpoint} does not exist (stages with a checkpoint: {have})")
    return checkpoint


class _WithPreprocessing(torch.nn.Module):
    """``model`` behind its data set's normalisation: takes images as the data set stores them
    (uint8 0..255 or float 0..1, NCHW) and computes ``model((x * scale - mean[c]) / std[c])``."""

    def __init__(self, model: torch.nn.Module, preprocessing: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        std = torch.tensor(preprocessing["std"], dtype=torch.float32)
        mean = torch.tensor(preprocessing["mean"], dtype=torch.float32)
        self.register_buffer("mul", (float(preprocessing["scale"]) / std).view(1, -1, 1, 1))
        self.register_buffer("add", (-mean / std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.float32) * self.mul + self.add)


def _check_preprocessing(pre: Any, checkpoint: str | Path, channels: int) -> dict[str, Any]:
    keys = ("layout", "dtype", "value_range", "scale", "mean", "std")
    if not (isinstance(pre, dict) and all(k in pre for k in keys) and pre["dtype"] in ("uint8", "float32")
            and len(pre["mean"]) == len(pre["std"]) == channels and all(float(v) > 0 for v in pre["std"])):
        raise ValueError(f"checkpoint: {checkpoint} records no usable preprocessing (extra['preprocessing']; "
                         "checkpoints written before it existed lack it): export it without --with-preprocessing "
                         "and normalise the input yourself")
    return pre


def onnx_metadata(pre: dict[str, Any] | None, *, baked: bool, stage: Any, checkpoint_sha256: str) -> dict[str, str]:
    """The ``metadata_props`` an exported file carries: what its input must be, how the data set's images were
    normalised (``mean``/``std`` per channel in 0..1 units, JSON lists) and which checkpoint it came from."""
    meta = {"hwsplit.stage": str(stage), "hwsplit.checkpoint_sha256": checkpoint_sha256,
            "preprocessing_baked_in": "true" if baked else "false", "input_layout": "NCHW"}
    if pre is None:
        meta["input"] = "normalised float32 NCHW (the checkpoint records no preprocessing)"
        return meta
    raw = f"{pre['dtype']} {pre['value_range'][0]}..{pre['value_range'][1]}"
    meta.update({
        "hwsplit.preprocessing": json.dumps(pre, sort_keys=True),
        "input_dtype": pre["dtype"] if baked else "float32",
        "input": (f"images as the data set stores them: {raw}, NCHW; normalisation is in the graph" if baked else
                  f"normalised float32 NCHW: (x * {pre['scale']:.6g} - mean[c]) / std[c] of images stored as {raw}"),
        "raw_value_range": json.dumps(pre["value_range"]),
        "mean": json.dumps(pre["mean"]),
        "std": json.dumps(pre["std"]),
        "normalize": pre.get("normalize", "(x * scale - mean[c]) / std[c]"),
        "scale": repr(float(pre["scale"])),
        "source": str(pre.get("source", "")),
    })
    return meta


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (see :func:`onnx_metadata`)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_onnx(checkpoint: str | Path, out: str | Path, *, atol: float = 1e-4, batch_sizes: tuple[int, ...] = (1, 4),
                opset: int | None = None, seed: int = 0, with_preprocessing: bool = False) -> dict[str, Any]:
    """Export ``checkpoint`` to the ONNX file ``out`` and verify it with onnxruntime.

    The input shape comes from the checkpoint's ``extra["input_shape"]``; axis 0 of the input
    (``"input"``) and output (``"logits"``) is dynamic. The file's ``metadata_props`` carry the
    preprocessing (:func:`onnx_metadata`). ``with_preprocessing=True`` bakes the normalisation into the
    graph: the input is then the image as the data set stores it (``uint8`` 0..255 for CIFAR and npz,
    ``float32`` 0..1 for digits and image folders; NCHW), and it is verified on such raw images against
    PyTorch's model on the normalised ones. Random inputs (``torch.Generator`` seeded with ``seed``,
    normal, or raw images, one batch per entry of ``batch_sizes``) go through both; raises
    :class:`ExportMismatchError` if the largest absolute difference exceeds ``atol`` (nothing is
    written then). Returns ``{"path", "stage", "input_shape", "input_dtype", "max_abs_diff",
    "batch_sizes", "opset", "bytes", "metadata", "with_preprocessing"}``.
    """
    import onnx
    import onnxruntime as ort

    check_writable_name(out)
    payload = load_checkpoint(checkpoint)
    shape = payload.get("extra", {}).get("input_shape")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"checkpoint: {checkpoint} records no input shape (extra['input_shape']); "
                         "export needs it")
    pre = payload.get("extra", {}).get("preprocessing")
    if with_preprocessing:
        if len(shape) != 4:
            raise ValueError(f"checkpoint: {checkpoint} takes input {shape}, not images (N, C, H, W); "
                             "--with-preprocessing needs images")
        pre = _check_preprocessing(pre, checkpoint, shape[1])
    elif not isinstance(pre, dict):
        pre = None
    model = load_model(checkpoint).float().eval()
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise ValueError(f"onnx: directory {out.parent} does not exist")
    uint8 = with_preprocessing and pre is not None and pre["dtype"] == "uint8"
    graph = _WithPreprocessing(model, pre).eval() if with_preprocessing and pre is not None else model
    buffer = io.BytesIO()
    example = torch.zeros(shape, dtype=torch.uint8 if uint8 else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter says it is legacy
        torch.onnx.export(graph, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = onnx_metadata(pre, baked=with_preprocessing, stage=payload.get("stage"),
                             checkpoint_sha256=file_sha256(checkpoint))
    onnx.helper.set_model_props(proto, metadata)
    data = proto.SerializeToString()
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    for batch in batch_sizes:
        size = (batch, *shape[1:])
        if not with_preprocessing:
            x = torch.randn(size, generator=gen)
        elif uint8:
            x = torch.randint(0, 256, size, generator=gen, dtype=torch.uint8)
        else:
            x = torch.rand(size, generator=gen)
        with torch.no_grad():  # PyTorch's reference: the plain model on the normalised input
            expected = model(_normalise(x, pre) if with_preprocessing else x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatchError(f"onnx: output shape {got.shape} for a batch of {batch}, "
                                      f"PyTorch gives {expected.shape}")
        max_diff = max(max_diff, float(abs(got - expected).max()))
    if not max_diff <= atol:
        raise ExportMismatchError(f"onnx: onnxruntime's outputs differ from PyTorch's by up to {max_diff:.3g} "
                                  f"(tolerance {atol:g}); {out} not written")
    atomic_write(out, lambda f: f.write(data), binary=True)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    log.info("exported %s to %s (max |onnxruntime - torch| = %.3g)", checkpoint, out, max_diff)
    return {"path": str(out), "stage": payload.get("stage"), "input_shape": shape,
            "input_dtype": "uint8" if uint8 else "float32", "max_abs_diff": max_diff,
            "batch_sizes": list(batch_sizes), "opset": opset_used, "bytes": len(data), "metadata": metadata,
            "with_preprocessing": bool(with_preprocessing)}


def _normalise(x: torch.Tensor, pre: dict[str, Any]) -> torch.Tensor:
    """What the data set's loader gives the network for stored images ``x``
    (hwsplit.training.bundle.TensorImageDataset)."""
    mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x.to(torch.float32) * float(pre["scale"]) - mean) / std


__all__ = ["ExportMismatchError", "export_onnx", "export_run", "onnx_metadata", "read_metadata", "resolve_checkpoint"]


def export_run(run_or_checkpoint: str | Path, out: str | Path, *, stage: int | None = None,
               atol: float = 1e-4, with_preprocessing: bool = False) -> dict[str, Any]:
    """:func:`export_onnx` of a run's stage (:func:`resolve_checkpoint`), refused while another
    process writes the run (:class:`~hwsplit.infra.errors.RunLocked`) and for a fine-tuned directory whose
    source stages changed since (:func:`hwsplit.run.rundir.check_source`). An export from a run directory
    is listed in its ``exports.json``, so that replacing the run removes it. Returns export_onnx's
    dict plus ``"checkpoint"``."""
    checkpoint = resolve_checkpoint(run_or_checkpoint, stage)
    path = Path(run_or_checkpoint)
    check_source(RunDir(path if path.is_dir() else checkpoint.parent))
    if path.is_dir():
        run = RunDir(path)
        with run.lock("export"):
            info = export_onnx(checkpoint, out, atol=atol, with_preprocessing=with_preprocessing)
            record_export(run, out, checkpoint=checkpoint)
    else:
        info = export_onnx(checkpoint, out, atol=atol, with_preprocessing=with_preprocessing)
    return {**info, "checkpoint": checkpoint}
