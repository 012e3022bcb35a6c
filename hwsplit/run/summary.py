"""Per-layer widths, MACs and parameters of a model family or a stage checkpoint (``cli.py summary``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.network.families import get_family
from hwsplit.network.graph import find_neuron_groups, layer_specs
from hwsplit.network.models import build_model
from hwsplit.run.rundir import RunDir, check_source, mark_interrupted, stage_table

#: Largest input side and channel count a summary traces (a zero input of 3×4096² floats is 200 MB).
MAX_SIDE = 4096


def model_summary(model_or_checkpoint: str | Path, *, resolution: int | None = None,
                  in_channels: int | None = None) -> dict[str, Any]:
    """Rows (header first) of per-layer kind, channels, kernel, stride, input size, MACs, params and
    splittability, plus ``input_shape``, ``macs`` (conv + linear multiply-accumulates) and ``params``.

    A ``.pt`` path (or existing file) is a checkpoint, traced at its recorded input shape unless
    ``resolution``/``in_channels`` override it; anything else is a family name, traced at its
    default resolution (224 for ImageNet families, 32 otherwise).
    """
    for name, value in (("resolution", resolution), ("in_channels", in_channels)):
        if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_SIDE):
            raise ValueError(f"{name}: expected an integer in 1..{MAX_SIDE}, got {value!r}")
    path = Path(model_or_checkpoint)
    if path.suffix == ".pt" or path.is_file():
        payload = load_checkpoint(path)
        model = load_model(path)
        shape = payload.get("extra", {}).get("input_shape")
        if shape is None:
            shape = [1, in_channels or 3, resolution or 32, resolution or 32]
        shape = [1, in_channels or shape[1], resolution or shape[2], resolution or shape[3]]
    else:
        name = str(model_or_checkpoint)
        family = get_family(name)
        options: dict[str, Any] = {}
        if resolution is not None:
            options["resolution"] = resolution
        if in_channels is not None:
            options["in_channels"] = in_channels
        model = build_model(name, **options)
        if family.default_resolution is None:
            shape = [1, model.spec.in_features]
        else:
            res = resolution or family.default_resolution
            shape = [1, in_channels or 3, res, res]
    specs = layer_specs(model, tuple(shape))
    groups = {g.name: g for g in find_neuron_groups(model, torch.zeros(shape))}
    rows = [["layer", "kind", "in", "out", "k", "s", "input", "MACs", "params", "splittable"]]
    for s in specs:
        g = groups.get(s.name)
        rows.append([s.name, s.kind, str(s.in_channels), str(s.out_channels), str(s.kernel), str(s.stride),
                     f"{s.height}x{s.width}", f"{s.macs:,}", f"{s.params:,}",
                     "yes" if g is not None and g.splittable else "" if g is None else f"no: {g.reason}"])
    return {"rows": rows, "input_shape": tuple(shape), "macs": sum(s.macs for s in specs),
            "params": sum(p.numel() for p in model.parameters())}


def run_summary(path: str | Path) -> dict[str, Any]:
    """A run directory's stage table (``rows``, header first, as ``grow`` prints it) and its ``status``: what
    its summary.md says, or ``interrupted`` with the command that continues it when it says running and no
    live process holds the run (:func:`hwsplit.run.rundir.mark_interrupted`, which corrects summary.md too).
    ``ValueError`` when ``path`` is not a run; ``ConfigError`` for a fine-tuning whose source changed."""
    run = RunDir(path)
    if not run.is_run():
        raise ValueError(f"run: {run.path} is not an hwsplit run directory (no config.json, stages.jsonl or "
                         "stage-K.pt)")
    check_source(run)
    return {"path": str(run.path), "rows": stage_table(run.records()), "status": mark_interrupted(run)}


__all__ = ["model_summary", "run_summary"]
