"""The stage loop and the run directory.

    stage 0: train the seed
    stage k: splitting indices → marginal costs on the current architecture → budget
             → knapsack selection → split → train

A run directory holds ``config.json`` (what was asked), ``stages.jsonl`` (one JSON record per
completed stage), ``stage-K.pt`` (architecture + weights, loadable with ``weights_only=True``) and
``summary.md`` (the same records, for people). Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cost_models
from hwsplit.checkpoint import atomic_write_json, atomic_write_text, load_model, save_checkpoint
from hwsplit.data import DataBundle, load_dataset, make_loaders
from hwsplit.graph import find_neuron_groups
from hwsplit.models import architecture, build_model, default_config
from hwsplit.score import splitting_indices
from hwsplit.select import select_neurons
from hwsplit.surgery import apply_split
from hwsplit.train import TrainConfig, evaluate, seed_everything, train

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, int], Iterable]

STOP_STAGES = "stages done"
STOP_NO_NEGATIVE = "no neuron has a negative splitting index"
STOP_BUDGET = "budget reached"

# Units a budget may be written in, per cost-model unit: suffix → multiplier to the model's unit.
_UNIT_SUFFIXES = {
    "MACs": {"": 1.0, "macs": 1.0, "k": 1e3, "kmacs": 1e3, "m": 1e6, "mmacs": 1e6, "g": 1e9, "gmacs": 1e9},
    "ms": {"ms": 1.0, "s": 1e3, "us": 1e-3},
    "mJ": {"mj": 1.0, "j": 1e3, "uj": 1e-3},
    "neurons": {"": 1.0, "neurons": 1.0},
}


def parse_budget(text: str | float, unit: str) -> float:
    """A budget such as ``"4.5ms"``, ``"12mJ"`` or ``"300M"`` (MACs) in the cost model's ``unit``.

    Raises ``ValueError`` naming the budget when the number is malformed or its unit does not
    match the cost model's (e.g. ``"4.5ms"`` for an energy model in mJ).
    """
    if isinstance(text, (int, float)):
        value, suffix = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*", str(text))
        if not m:
            raise ValueError(f"budget: cannot read {text!r}; write a number with its unit, e.g. 4.5ms, 12mJ, 300M")
        value, suffix = float(m.group(1)), m.group(2).replace("µ", "u").lower()
    table = _UNIT_SUFFIXES.get(unit, {unit.lower(): 1.0})
    if suffix not in table:
        accepted = ", ".join(s for s in table if s) or "a plain number"
        raise ValueError(f"budget: unit {suffix or '(none)'!r} does not match the cost model's unit {unit!r} "
                         f"(accepted: {accepted})")
    if not value > 0:
        raise ValueError(f"budget: must be positive, got {text!r}")
    return value * table[suffix]


@dataclass
class GrowConfig:
    """Everything a growth run depends on (saved as config.json)."""

    model: str = "mobilenet_v1"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    data_limit: int | None = None
    cost: str = "flops"
    cost_options: dict[str, Any] = field(default_factory=dict)
    growth_ratio: float = 0.5
    stages: int = 4
    budget: float | None = None  # absolute, in the cost model's unit
    epochs: int = 15
    seed_epochs: int | None = None  # stage 0; defaults to epochs
    split_epochs: int = 1
    split_method: str = "rayleigh"
    split_step: float = 1e-2
    split_lr: float = 0.05
    selection: str = "lp"
    max_layer_growth: float | None = None  # cap per layer and stage, as a fraction of its width
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    device: str = "cpu"
    seed: int = 0
    measure: bool | None = None  # measure each stage end to end; None: with --cost lut|energy
    measure_time_s: float = 1.0

    @property
    def profile(self) -> str | None:
        return self.cost_options.get("profile")

    def __post_init__(self) -> None:
        checks = {
            "growth_ratio": self.growth_ratio > 0,
            "stages": isinstance(self.stages, int) and self.stages >= 0,
            "epochs": isinstance(self.epochs, int) and self.epochs >= 1,
            "split_epochs": isinstance(self.split_epochs, int) and self.split_epochs >= 1,
            "split_step": self.split_step >= 0,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "budget": self.budget is None or self.budget > 0,
            "seed_epochs": self.seed_epochs is None or (isinstance(self.seed_epochs, int) and self.seed_epochs >= 1),
            "max_layer_growth": self.max_layer_growth is None or 0 < self.max_layer_growth <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        if self.split_method not in ("rayleigh", "exact"):
            raise ValueError(f"split_method: expected rayleigh or exact, got {self.split_method!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=self.lr, weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, schedule=self.schedule)


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    stages = property(lambda self: self.path / "stages.jsonl")
    summary = property(lambda self: self.path / "summary.md")

    def checkpoint(self, stage: int) -> Path:
        return self.path / f"stage-{stage}.pt"

    def records(self) -> list[dict[str, Any]]:
        if not self.stages.exists():
            return []
        return [json.loads(line) for line in self.stages.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        records = self.records() + [record]
        atomic_write_text(self.stages, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths(groups: list) -> dict[str, int]:
    return {g.name: g.width for g in groups}


def build_seed(config: GrowConfig, bundle: DataBundle) -> nn.Module:
    """The stage-0 model of ``config.model`` sized for ``bundle``'s inputs and classes."""
    c, h, _ = bundle.input_shape
    options = dict(config.model_options)
    if config.model == "mobilenet_v1":
        options.setdefault("config", default_config(h))
    if config.model.startswith("mobilenet_v1"):
        options.setdefault("in_channels", c)
        options.setdefault("resolution", h)
        options.setdefault("num_classes", bundle.num_classes)
    elif config.model == "mlp":
        options.setdefault("in_features", c * h * bundle.input_shape[2])
        options.setdefault("num_classes", bundle.num_classes)
    return build_model(config.model, **options)


def grow(config: GrowConfig, out: str | Path, *, progress: Progress | None = None,
         on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the stage loop, writing the run directory ``out``; returns the stage records.

    ``progress`` wraps long loops (``progress(iterable, desc, total)``, e.g. tqdm); ``on_stage`` is
    called with each record as soon as the stage is on disk.
    """
    run = RunDir(out)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.config, config.to_dict())
    seed_everything(config.seed)
    device = torch.device(config.device)
    bundle = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed,
                          limit=config.data_limit)
    train_loader, test_loader = make_loaders(bundle, batch_size=config.batch_size, seed=config.seed,
                                             device=device if device.type == "cuda" else None)
    input_shape = (1, *bundle.input_shape)
    cost_model = cost_models.get_cost_model(config.cost, **config.cost_options)
    flops = cost_models.get_cost_model("flops")

    model = build_seed(config, bundle).to(device)
    measure = _end_to_end_measurer(config)
    records: list[dict[str, Any]] = []
    stop_reason = STOP_STAGES

    def finish_stage(stage: int, extra: dict[str, Any], timings: dict[str, float], epochs: int) -> dict[str, Any]:
        nonlocal model
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(stage * 10_000)  # each stage's shuffles depend on the stage only
        t0 = time.perf_counter()
        fit = train(model, train_loader, config=config.train_config(epochs), device=device, progress=progress)
        timings["train_s"] = time.perf_counter() - t0
        test = evaluate(model, test_loader, device=device, progress=progress)
        groups = find_neuron_groups(model, torch.zeros(input_shape, device=device))
        record = {
            "stage": stage,
            "architecture": architecture(model),
            "widths": _widths([g for g in groups if g.splittable]),
            "train_loss": fit["loss"], "train_top1": fit["top1"],
            "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
            "macs": flops.total(model, input_shape),
            "params": _params(model),
            "cost": {"name": cost_model.name, "unit": cost_model.unit,
                     "value": cost_model.total(model, input_shape)},
            "seconds": timings,
            **extra,
        }
        if measure is not None:
            record["measured"] = measure(model, input_shape)
        save_checkpoint(run.checkpoint(stage), model, stage=stage, extra={"test_top1": test["top1"],
                                                                         "input_shape": list(input_shape)})
        run.append(record)
        records.append(record)
        _write_summary(run, config, records, stop_reason=None)
        log.info("stage %d: test top-1 %.4f, %.4g MACs, %s %.4g %s", stage, test["top1"], record["macs"],
                 cost_model.name, record["cost"]["value"], cost_model.unit)
        if on_stage:
            on_stage(record)
        return record

    finish_stage(0, {"split": {}, "neurons_split": 0}, {}, config.seed_epochs or config.epochs)

    for stage in range(1, config.stages + 1):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(stage * 10_000 - 1)
        scores = splitting_indices(model, train_loader, method=config.split_method, epochs=config.split_epochs,
                                   lr=config.split_lr, seed=config.seed + stage, progress=progress)
        timings["score_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        total = cost_model.total(model, input_shape)
        marginal = cost_model.marginal(model, input_shape)
        budget = config.growth_ratio * total
        if config.budget is not None:
            budget = min(budget, config.budget - total)
        eig = torch.cat([s.eigenvalues for s in scores.values()]) if scores else torch.zeros(0)
        n_negative = int((eig < 0).sum())
        if n_negative == 0:
            stop_reason = STOP_NO_NEGATIVE
            break
        if budget <= 0:
            stop_reason = STOP_BUDGET
            break
        caps = config.max_layer_growth
        plan = select_neurons(scores, {k: marginal[k] for k in scores}, budget, caps=caps, method=config.selection)
        if plan:
            plan = fit_plan_to_budget(plan, scores, marginal, lambda p: cost_model.total(
                apply_split(model, p, scores, step=0.0), input_shape) - total, budget)
        timings["select_s"] = time.perf_counter() - t0
        if not plan:
            stop_reason = STOP_BUDGET if n_negative else STOP_NO_NEGATIVE
            break

        t0 = time.perf_counter()
        before = evaluate(model, test_loader, device=device)["loss"]
        model = apply_split(model, plan, scores, step=config.split_step).to(device)
        after = evaluate(model, test_loader, device=device)["loss"]
        timings["split_s"] = time.perf_counter() - t0
        chosen = torch.cat([scores[k].eigenvalues[v] for k, v in plan.items()])
        extra = {
            "split": {k: int(v.numel()) for k, v in plan.items()},
            "neurons_split": int(sum(v.numel() for v in plan.values())),
            "budget": {"value": budget, "unit": cost_model.unit,
                       "used": float(sum(marginal[k] * v.numel() for k, v in plan.items()))},
            "eigenvalues": {
                "min": float(eig.min()), "median": float(eig.median()), "negative": n_negative,
                "count": int(eig.numel()),
                "per_layer_min": {k: float(s.eigenvalues.min()) for k, s in scores.items()},
                "chosen_sum": float(chosen.sum()),
            },
            "loss_before_split": before,
            "loss_after_split": after,
            "predicted_loss_change": 0.5 * config.split_step ** 2 * float(chosen.sum()),
        }
        finish_stage(stage, extra, timings, config.epochs)
        if config.budget is not None and records[-1]["cost"]["value"] >= config.budget * (1 - 1e-9):
            stop_reason = STOP_BUDGET
            break

    _write_summary(run, config, records, stop_reason=stop_reason)
    log.info("stopped: %s", stop_reason)
    return records


def fit_plan_to_budget(plan: dict[str, torch.Tensor], scores: dict[str, Any], marginal: dict[str, float],
                       increase: Callable[[dict[str, torch.Tensor]], float], budget: float,
                       max_rounds: int = 20) -> dict[str, torch.Tensor]:
    """Drop the least valuable chosen neurons until the *actual* cost increase fits the budget.

    The knapsack prices neurons one at a time; splitting neighbouring layers together also adds
    their cross terms (a conv grows in both its input and its output channels), so the real
    increase can exceed the sum of marginals by a few percent. ``increase(plan)`` measures it on
    the architecture the plan would produce; neurons with the worst λ/cost ratio go first.
    """
    items = sorted(((float(scores[k].eigenvalues[int(j)]) / marginal[k], k, int(j))
                    for k, v in plan.items() for j in v), reverse=True)  # worst (least negative per cost) first
    for _ in range(max_rounds):
        over = increase(plan) - budget
        if over <= 1e-9 * max(1.0, abs(budget)) or not items:
            return plan
        drop, freed = [], 0.0
        while items and freed < over:
            _, k, j = items.pop(0)
            drop.append((k, j))
            freed += marginal[k]
        dropped: dict[str, set[int]] = {}
        for k, j in drop:
            dropped.setdefault(k, set()).add(j)
        plan = {k: torch.tensor([j for j in v.tolist() if j not in dropped.get(k, ())], dtype=torch.long)
                for k, v in plan.items()}
        plan = {k: v for k, v in plan.items() if v.numel()}
        log.info("dropped %d neurons whose joint cost exceeded the budget by %.4g", len(drop), over)
    return plan


def _end_to_end_measurer(config: GrowConfig) -> Callable[[nn.Module, tuple[int, ...]], dict[str, Any]] | None:
    """A function measuring a whole network as the profile's device measured its layers, or None.

    Uses the profile's backend, meter and threads on the device the profile was made on, when
    this machine has that kind of device; otherwise every stage records why it was not measured.
    A profile from another machine is allowed (that is what tables are for) and said so.
    """
    wanted = config.measure if config.measure is not None else config.profile is not None
    if not wanted:
        return None
    from cost_models.meters import nvidia_gpu_available
    from cost_models.profile_io import load_profile
    from cost_models.profiler import _cpu_name, measure_model

    if config.profile is None:
        backend, meter, kind, threads, name = "onnxruntime", "latency", "cpu", None, None
    else:
        profile = load_profile(config.profile)
        dev = profile.get("device", {})
        backend, meter = profile.get("backend", "onnxruntime"), profile.get("meter", "latency")
        kind, threads, name = dev.get("kind", "cpu"), dev.get("threads"), dev.get("name")
    here = _cpu_name() if kind == "cpu" else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    same = name is None or name == here
    if not same:
        log.warning("the profile was measured on %r, this machine is %r: costs are predictions for the "
                    "profile's device, end-to-end measurements are of this one", name, here)
    reason = None
    if kind == "cuda" and not torch.cuda.is_available():
        reason = "the profile is of a CUDA device and this machine has none"
    elif meter == "nvml" and not nvidia_gpu_available():
        reason = "the profile measured NVML energy and this machine has no NVIDIA GPU"

    def measure(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
        info: dict[str, Any] = {"device": here, "backend": backend, "meter": meter, "same_device_as_profile": same}
        if reason is not None:
            return {**info, "skipped": reason}
        result = measure_model(model, input_shape, device="cpu" if kind == "cpu" else "cuda", backend=backend,
                               meter=meter, threads=threads, time_budget_s=config.measure_time_s)
        return {**info, **result}

    return measure


def _fmt_num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.4g}"


def stage_table(records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows (header first) of the per-stage table the CLI prints and summary.md shows."""
    unit = records[0]["cost"]["unit"] if records else ""
    measured = any("measured" in r for r in records)
    rows = [["stage", "test top-1", "test loss", "MACs", "params", f"cost ({unit})"]
            + (["measured ms"] if measured else []) + ["split", "widths"]]
    for r in records:
        widths = r["architecture"].get("widths", list(r["widths"].values()))
        row = [str(r["stage"]), f"{r['test_top1']:.4f}", f"{r['test_loss']:.4f}", _fmt_num(r["macs"]),
               _fmt_num(r["params"]), f"{r['cost']['value']:.4g}"]
        if measured:
            lat = (r.get("measured") or {}).get("latency_ms")
            row.append(f"{lat['median']:.4g}" if lat else "-")
        rows.append(row + [str(r.get("neurons_split", 0)), " ".join(str(w) for w in widths)])
    return rows


def _write_summary(run: RunDir, config: GrowConfig, records: list[dict[str, Any]], *, stop_reason: str | None) -> None:
    rows = stage_table(records)
    lines = [f"# hwsplit run: {config.model} on {config.dataset}, cost {config.cost}", "",
             f"growth ratio {config.growth_ratio}, budget {config.budget}, {config.epochs} epochs per stage, "
             f"split by {config.split_method} ({config.split_epochs} epoch(s)), step {config.split_step}, "
             f"seed {config.seed}", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines.append(f"Status: {'stopped: ' + stop_reason if stop_reason else 'running'}")
    lines.append("")
    lines.append("Load a stage: `hwsplit.checkpoint.load_model('stage-K.pt')`.")
    atomic_write_text(run.summary, "\n".join(lines) + "\n")


__all__ = ["GrowConfig", "RunDir", "build_seed", "grow", "load_model", "parse_budget", "stage_table"]
