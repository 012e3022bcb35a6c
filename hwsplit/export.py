"""Export a stage of a run to ONNX and check it against PyTorch with onnxruntime.

The checkpoint is rebuilt with :func:`hwsplit.checkpoint.load_model` (weights only, no pickle),
exported with PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``; the
``torch.export`` one needs onnxscript) with a dynamic batch axis, and run in an onnxruntime CPU
session on random inputs of several batch sizes. The file is written (atomically) only when the
outputs agree with PyTorch's within the tolerance.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from hwsplit.checkpoint import load_checkpoint, load_model
from hwsplit.errors import RunFailed
from hwsplit.fsio import atomic_write, check_writable_name
from hwsplit.rundir import RunDir

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


def export_onnx(checkpoint: str | Path, out: str | Path, *, atol: float = 1e-4, batch_sizes: tuple[int, ...] = (1, 4),
                opset: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Export ``checkpoint`` to the ONNX file ``out`` and verify it with onnxruntime.

    The input shape comes from the checkpoint's ``extra["input_shape"]``; axis 0 of the input
    (``"input"``) and output (``"logits"``) is dynamic. Random inputs (``torch.Generator`` seeded
    with ``seed``, normal, one per entry of ``batch_sizes``) go through both; raises
    :class:`ExportMismatchError` if the largest absolute difference exceeds ``atol`` (nothing is
    written then). Returns ``{"path", "stage", "input_shape", "max_abs_diff", "batch_sizes",
    "opset", "bytes"}``.
    """
    import onnx
    import onnxruntime as ort

    check_writable_name(out)
    payload = load_checkpoint(checkpoint)
    shape = payload.get("extra", {}).get("input_shape")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"checkpoint: {checkpoint} records no input shape (extra['input_shape']); "
                         "export needs it")
    model = load_model(checkpoint).float().eval()
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise ValueError(f"onnx: directory {out.parent} does not exist")
    buffer = io.BytesIO()
    example = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter says it is legacy
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    max_diff = 0.0
    for batch in batch_sizes:
        x = torch.randn((batch, *shape[1:]), generator=gen)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatchError(f"onnx: output shape {got.shape} for a batch of {batch}, "
                                      f"PyTorch gives {expected.shape}")
        max_diff = max(max_diff, float(abs(got - expected).max()))
    if not max_diff <= atol:
        raise ExportMismatchError(f"onnx: onnxruntime's outputs differ from PyTorch's by up to {max_diff:.3g} "
                                  f"(tolerance {atol:g}); {out} not written")
    atomic_write(out, lambda f: f.write(data), binary=True)
    opset_used = next((o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx")),
                      None)
    log.info("exported %s to %s (max |onnxruntime - torch| = %.3g)", checkpoint, out, max_diff)
    return {"path": str(out), "stage": payload.get("stage"), "input_shape": shape, "max_abs_diff": max_diff,
            "batch_sizes": list(batch_sizes), "opset": opset_used, "bytes": len(data)}


__all__ = ["ExportMismatchError", "export_onnx", "export_run", "resolve_checkpoint"]


def export_run(run_or_checkpoint: str | Path, out: str | Path, *, stage: int | None = None,
               atol: float = 1e-4) -> dict[str, Any]:
    """:func:`export_onnx` of a run's stage (:func:`resolve_checkpoint`), refused while another
    process writes the run (:class:`~hwsplit.errors.RunLocked`). Returns export_onnx's dict plus
    ``"checkpoint"``."""
    checkpoint = resolve_checkpoint(run_or_checkpoint, stage)
    path = Path(run_or_checkpoint)
    if path.is_dir():
        with RunDir(path).lock("export"):
            info = export_onnx(checkpoint, out, atol=atol)
    else:
        info = export_onnx(checkpoint, out, atol=atol)
    return {**info, "checkpoint": checkpoint}
