"""The stage loop and the run directory.

    stage 0: train the seed
    stage k: splitting indices → marginal costs on the current architecture → budget
             → knapsack selection → split → train

A run directory holds ``config.json`` (what was asked), ``stages.jsonl`` (one JSON record per
completed stage), ``stage-K.pt`` (architecture + weights, loadable with ``weights_only=True``) and
``summary.md`` (the same records, for people). Every file is written atomically.

**Determinism and resume.** Each stage starts from the previous stage's weights (in memory, or
read back from ``stage-K.pt``) and re-seeds every random number generator with
:func:`stage_seed`; its data order comes from loader epochs derived from the stage number and its
Rayleigh-quotient start from ``seed + stage``. Nothing random carries over from one stage to the
next, so a run resumed after a crash at any moment (``grow(..., resume=True)``) continues after
its last completed stage and ends, on the CPU, with the same per-stage architectures and weights
as an uninterrupted run. A stage is complete when its record is in ``stages.jsonl`` (written after
its checkpoint); a checkpoint without a record is redone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cost_models
from hwsplit.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint, load_model, save_checkpoint
from hwsplit.data import DataBundle, load_dataset, make_loaders
from hwsplit.graph import find_neuron_groups
from hwsplit.models import TORCHVISION_MOBILENET_V2, architecture, build_model, default_config
from hwsplit.score import splitting_indices
from hwsplit.select import select_neurons
from hwsplit.surgery import apply_split
from hwsplit.train import TrainConfig, evaluate, seed_everything, train
from hwsplit.units import fmt_si

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, int], Iterable]

STOP_STAGES = "stages done"
STOP_NO_NEGATIVE = "no neuron has a negative splitting index"
STOP_BUDGET = "budget reached"

SELECTIONS = ("lp", "milp", "greedy", "random")

# Test hook for crash-safety tests: SIGKILL the process at a named point ("stage-K:<point>").
KILL_AT_ENV = "HWSPLIT_KILL_AT"

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
    test_limit: int | str | None = "auto"  # test images: "auto" = data_limit // 5 (all without a limit), None = all
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
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.split_method not in ("rayleigh", "exact"):
            raise ValueError(f"split_method: expected rayleigh or exact, got {self.split_method!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=self.lr, weight_decay=self.weight_decay,
                           label_smoothing=self.label_smoothing, schedule=self.schedule)



class StageFailed(RuntimeError):
    """A stage could not complete (a non-finite loss, a failed write). Earlier stages are intact.

    ``stage`` is the stage that failed, ``run`` the run directory; ``summary.md`` says why.
    """

    def __init__(self, message: str, *, stage: int, run: Path) -> None:
        super().__init__(message)
        self.stage = stage
        self.run = run


class WriteFailed(OSError):
    """Writing a file of the run directory failed (disk full, permission); the previous file is intact."""


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    stages = property(lambda self: self.path / "stages.jsonl")
    summary = property(lambda self: self.path / "summary.md")

    def checkpoint(self, stage: int) -> Path:
        return self.path / f"stage-{stage}.pt"

    def checkpoints(self) -> dict[int, Path]:
        """Existing ``stage-K.pt`` files by K."""
        out = {}
        for p in self.path.glob("stage-*.pt"):
            m = re.fullmatch(r"stage-(\d+)\.pt", p.name)
            if m:
                out[int(m.group(1))] = p
        return dict(sorted(out.items()))

    def temporaries(self) -> list[Path]:
        """Temporary files an interrupted atomic write may have left (``.NAME.XXXX.tmp``)."""
        return sorted(p for p in self.path.glob(".*.tmp") if p.is_file())

    def records(self) -> list[dict[str, Any]]:
        if not self.stages.exists():
            return []
        records = []
        for i, line in enumerate(self.stages.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"run: {self.stages} line {i} is not JSON ({err})") from None
        return records

    def write_records(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.stages, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def append(self, record: dict[str, Any]) -> None:
        self.write_records(self.records() + [record])


def start_fresh(run: RunDir) -> None:
    """Create ``run`` or empty it of a previous run's files (a warning says what was replaced)."""
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        old = len(run.records())
    except ValueError:  # an unreadable stages.jsonl is replaced too
        old = -1
    if old:
        log.warning("replacing the run in %s (%s completed stage(s)); resume continues a run instead",
                    run.path, old if old > 0 else "unreadable")
    # config.json first: killed half-way, the directory holds no run to resume rather than a mix of two
    for p in [run.config, run.stages, *run.checkpoints().values(), *run.temporaries(), run.summary]:
        if p.exists():
            p.unlink()


def load_config(out: str | Path) -> GrowConfig:
    """The :class:`GrowConfig` saved in a grow run directory's config.json."""
    from hwsplit.baselines import read_config

    data = read_config(out)
    if data.get("baseline"):
        raise ValueError(f"resume: {out} is a {data['baseline']} baseline, not a grow run")
    known = {f.name for f in dataclasses.fields(GrowConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"resume: {Path(out) / 'config.json'} has unknown field(s) {', '.join(unknown)}")
    return GrowConfig(**data)


def stage_seed(config: GrowConfig, stage: int) -> int:
    """The seed of every global random number generator at the start of ``stage``."""
    return config.seed * 1000 + stage


def _kill_point(point: str) -> None:
    """SIGKILL this process when the environment variable HWSPLIT_KILL_AT names ``point`` (tests only)."""
    if os.environ.get(KILL_AT_ENV) == point:
        log.warning("%s=%s: killing this process", KILL_AT_ENV, point)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_options(config: GrowConfig, bundle: DataBundle) -> dict[str, Any]:
    """Builder options of the stage-0 model: ``config.model_options`` completed from the data."""
    c, h, w = bundle.input_shape
    options = dict(config.model_options)
    if config.model == "mobilenet_v1":
        options.setdefault("config", default_config(h))
    if config.model.startswith("mobilenet_v1"):
        options.setdefault("in_channels", c)
        options.setdefault("resolution", h)
        options.setdefault("num_classes", bundle.num_classes)
    elif config.model == "mlp":
        options.setdefault("in_features", c * h * w)
        options.setdefault("num_classes", bundle.num_classes)
    elif config.model == TORCHVISION_MOBILENET_V2:
        # in_channels other than 3 (e.g. 1-channel digits) replaces torchvision's stem convolution
        options.setdefault("in_channels", c)
        options.setdefault("num_classes", bundle.num_classes)
    return options


def build_seed(config: GrowConfig, bundle: DataBundle, *, width_mult: float = 1.0) -> nn.Module:
    """The stage-0 model of ``config.model`` sized for ``bundle``'s inputs and classes.

    ``width_mult`` multiplies the configured width multiplier (the width baseline's scaling).
    """
    options = seed_options(config, bundle)
    if width_mult != 1.0:
        options["width_mult"] = options.get("width_mult", 1.0) * width_mult
    return build_model(config.model, **options)


@dataclass
class Session:
    """What every stage of a run uses: data, loaders, device, cost models, end-to-end measurer."""

    config: GrowConfig
    bundle: DataBundle
    train_loader: Any
    test_loader: Any
    device: torch.device
    input_shape: tuple[int, ...]
    cost_model: Any
    flops: Any
    measure: Callable[[nn.Module, tuple[int, ...]], dict[str, Any]] | None


def open_session(config: GrowConfig) -> Session:
    seed_everything(config.seed)
    device = torch.device(config.device)
    bundle = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed,
                          limit=config.data_limit, test_limit=config.test_limit)
    train_loader, test_loader = make_loaders(bundle, batch_size=config.batch_size, seed=config.seed,
                                             device=device if device.type == "cuda" else None)
    return Session(config=config, bundle=bundle, train_loader=train_loader, test_loader=test_loader, device=device,
                   input_shape=(1, *bundle.input_shape),
                   cost_model=cost_models.get_cost_model(config.cost, **config.cost_options),
                   flops=cost_models.get_cost_model("flops"), measure=_end_to_end_measurer(config))


def train_and_record(session: Session, model: nn.Module, stage: int, *, epochs: int, loader_epoch: int,
                     timings: dict[str, float], extra: dict[str, Any],
                     progress: Progress | None = None) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` (data order from ``loader_epoch`` on), evaluate, describe: the record."""
    config, device, shape = session.config, session.device, session.input_shape
    if hasattr(session.train_loader, "set_epoch"):
        session.train_loader.set_epoch(loader_epoch)  # the shuffles depend on the stage only
    t0 = time.perf_counter()
    fit = train(model, session.train_loader, config=config.train_config(epochs), device=device, progress=progress)
    timings["train_s"] = time.perf_counter() - t0
    test = evaluate(model, session.test_loader, device=device, progress=progress)
    groups = [g for g in find_neuron_groups(model, torch.zeros(shape, device=device)) if g.splittable]
    record = {
        "stage": stage,
        "architecture": architecture(model),
        "layers": [g.name for g in groups],
        "widths": {g.name: g.width for g in groups},
        "train_loss": fit["loss"], "train_top1": fit["top1"],
        "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
        "macs": session.flops.total(model, shape),
        "params": _params(model),
        "cost": {"name": session.cost_model.name, "unit": session.cost_model.unit,
                 "value": session.cost_model.total(model, shape)},
        "seconds": timings,
        **extra,
    }
    if session.measure is not None:
        record["measured"] = session.measure(model, shape)
    return record


def write_stage(run: RunDir, session: Session, model: nn.Module, record: dict[str, Any],
                records: list[dict[str, Any]]) -> None:
    """Checkpoint, then record (the record is what makes the stage complete); appends to ``records``."""
    stage = record["stage"]
    path = run.checkpoint(stage)
    try:
        save_checkpoint(path, model, stage=stage, extra={"test_top1": record["test_top1"],
                                                         "input_shape": list(session.input_shape)})
        _kill_point(f"stage-{stage}:checkpoint")
        run.write_records(records + [record])
    except OSError as err:
        raise WriteFailed(f"could not write stage {stage} to {run.path} ({err.__class__.__name__}: {err})") from err
    records.append(record)
    _kill_point(f"stage-{stage}:record")


def _check_resume(run: RunDir, config: GrowConfig) -> list[dict[str, Any]]:
    """Make ``run`` consistent for resuming: the records of completed stages, stale files removed."""
    if not run.config.exists():
        raise ValueError(f"resume: {run.path} has no config.json (nothing to resume; start a new run)")
    saved = load_config(run.path)
    for f in dataclasses.fields(GrowConfig):
        if f.name != "stages" and getattr(saved, f.name) != getattr(config, f.name):
            raise ValueError(f"resume: {f.name} differs from {run.config} ({getattr(saved, f.name)!r} there, "
                             f"{getattr(config, f.name)!r} here)")
    for tmp in run.temporaries():
        log.info("removing %s, left by an interrupted write", tmp.name)
        tmp.unlink()
    records = run.records()
    checkpoints = run.checkpoints()
    kept: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        if r.get("stage") != i or i not in checkpoints:
            break
        kept.append(r)
    if kept:  # the last completed stage's checkpoint is what the run continues from: it must load
        payload = load_checkpoint(checkpoints[len(kept) - 1])
        if payload["architecture"] != kept[-1]["architecture"]:
            raise ValueError(f"resume: {checkpoints[len(kept) - 1]} does not hold the architecture recorded for "
                             f"stage {len(kept) - 1} in {run.stages}")
    if len(kept) != len(records):
        log.warning("resume: keeping %d of the %d records in %s", len(kept), len(records), run.stages)
        run.write_records(kept)
    for k, p in checkpoints.items():
        if k >= len(kept):
            log.info("resume: removing %s (its stage did not complete)", p.name)
            p.unlink()
    return kept


def grow(config: GrowConfig, out: str | Path, *, resume: bool = False, progress: Progress | None = None,
         on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the stage loop, writing the run directory ``out``; returns the stage records.

    ``resume=True`` continues the run in ``out`` after its last completed stage (``config`` must
    equal its config.json except for ``stages``, which may extend it); without it a previous run
    in ``out`` is replaced. ``progress`` wraps long loops (``progress(iterable, desc, total)``,
    e.g. tqdm); ``on_stage`` is called with each record as soon as the stage is on disk.

    Raises :class:`StageFailed` when a stage cannot complete — a non-finite training or scoring
    loss, or a failed write (disk full, permission) — after writing ``summary.md`` with the
    reason; the completed stages' checkpoints and records stay intact. ``KeyboardInterrupt``
    propagates after the same bookkeeping; no partial file is left behind.
    """
    run = RunDir(out)
    if resume:
        records = _check_resume(run, config)
    else:
        start_fresh(run)
        records = []
    atomic_write_json(run.config, config.to_dict())
    session = open_session(config)
    device, input_shape, cost_model = session.device, session.input_shape, session.cost_model
    train_loader, test_loader = session.train_loader, session.test_loader
    stop_reason = STOP_STAGES
    stage = len(records)
    if records:
        model = load_model(run.checkpoint(stage - 1)).to(device)
        log.info("resuming %s after stage %d", run.path, stage - 1)

    def finish_stage(stage: int, extra: dict[str, Any], timings: dict[str, float], epochs: int) -> dict[str, Any]:
        record = train_and_record(session, model, stage, epochs=epochs, loader_epoch=stage * 10_000,
                                  timings=timings, extra=extra, progress=progress)
        write_stage(run, session, model, record, records)
        write_summary(run, config, records, status="running")
        log.info("stage %d: test top-1 %.4f, %.4g MACs, %s %.4g %s", stage, record["test_top1"], record["macs"],
                 cost_model.name, record["cost"]["value"], cost_model.unit)
        if on_stage:
            on_stage(record)
        return record

    try:
        if stage == 0:
            seed_everything(stage_seed(config, 0))
            model = build_seed(config, session.bundle).to(device)
            finish_stage(0, {"split": {}, "neurons_split": 0}, {}, config.seed_epochs or config.epochs)
            stage = 1

        first = stage
        for stage in range(first, config.stages + 1):
            seed_everything(stage_seed(config, stage))
            _kill_point(f"stage-{stage}:start")
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(stage * 10_000 - 1)
            groups = find_neuron_groups(model, torch.zeros(input_shape, device=device))
            scores = splitting_indices(model, train_loader, method=config.split_method, epochs=config.split_epochs,
                                       lr=config.split_lr, seed=config.seed + stage, groups=groups,
                                       progress=progress)
            timings["score_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            total = cost_model.total(model, input_shape)
            marginal = cost_model.marginal(model, input_shape)
            budget = config.growth_ratio * total
            if config.budget is not None:
                budget = min(budget, config.budget - total)
            eig = torch.cat([s.eigenvalues for s in scores.values()]) if scores else torch.zeros(0)
            if not bool(torch.isfinite(eig).all()):
                raise FloatingPointError("scoring: some splitting indices are not finite")
            n_negative = int((eig < 0).sum())
            if n_negative == 0 and config.selection != "random":
                stop_reason = STOP_NO_NEGATIVE
                break
            if budget <= 0:
                stop_reason = STOP_BUDGET
                break
            caps = config.max_layer_growth
            costs = {k: marginal[k] for k in scores}
            rank = None
            if config.selection == "random":
                from hwsplit.baselines import random_selection

                plan = random_selection({k: len(s) for k, s in scores.items()}, costs, budget, caps=caps,
                                        seed=[config.seed, stage])
                rank = _random_rank([config.seed, stage, 1])
            else:
                plan = select_neurons(scores, costs, budget, caps=caps, method=config.selection)
            if plan:
                def increase(p: dict[str, torch.Tensor], m: nn.Module = model, s: dict = scores,
                             t: float = total) -> float:
                    return cost_model.total(apply_split(m, p, s, step=0.0), input_shape) - t

                plan = fit_plan_to_budget(plan, scores, marginal, increase, budget, rank=rank)
            timings["select_s"] = time.perf_counter() - t0
            if not plan:
                stop_reason = STOP_BUDGET if n_negative or config.selection == "random" else STOP_NO_NEGATIVE
                break

            t0 = time.perf_counter()
            before = evaluate(model, test_loader, device=device)["loss"]
            model = apply_split(model, plan, scores, step=config.split_step).to(device)
            after = evaluate(model, test_loader, device=device)["loss"]
            timings["split_s"] = time.perf_counter() - t0
            _kill_point(f"stage-{stage}:split")
            chosen = torch.cat([scores[k].eigenvalues[v] for k, v in plan.items()])
            extra = {
                "split": {k: int(v.numel()) for k, v in plan.items()},
                "neurons_split": int(sum(v.numel() for v in plan.values())),
                "selection": config.selection,
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
    except (FloatingPointError, WriteFailed) as err:
        what = "non-finite loss" if isinstance(err, FloatingPointError) else "write failed"
        reason = f"failed in stage {stage} ({what}): {err}"
        write_summary(run, config, records, status=reason, safe=True)
        kept = (f"stages 0-{len(records) - 1} in {run.path} are intact" if records
                else f"no stage of {run.path} completed")
        raise StageFailed(f"stage {stage} failed ({what}): {str(err).splitlines()[0]}; {kept}",
                          stage=stage, run=run.path) from None
    except KeyboardInterrupt:
        write_summary(run, config, records, safe=True,
                      status=f"interrupted in stage {stage}; continue with `grow --resume {run.path}`")
        raise

    write_summary(run, config, records, status=f"stopped: {stop_reason}")
    log.info("stopped: %s", stop_reason)
    return records


def _random_rank(seed: list[int]) -> Callable[[str, int], float]:
    """A random priority per (group, channel), for dropping neurons of a random plan in random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    table: dict[tuple[str, int], float] = {}

    def rank(name: str, channel: int) -> float:
        if (name, channel) not in table:
            table[(name, channel)] = float(rng.random())
        return table[(name, channel)]

    return rank


def fit_plan_to_budget(plan: dict[str, torch.Tensor], scores: dict[str, Any], marginal: dict[str, float],
                       increase: Callable[[dict[str, torch.Tensor]], float], budget: float,
                       max_rounds: int = 20, rank: Callable[[str, int], float] | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Drop the least valuable chosen neurons until the *actual* cost increase fits the budget.

    The knapsack prices neurons one at a time; splitting neighbouring layers together also adds
    their cross terms (a conv grows in both its input and its output channels), so the real
    increase can exceed the sum of marginals by a few percent. ``increase(plan)`` measures it on
    the architecture the plan would produce; neurons with the worst λ/cost ratio go first, or
    those with the highest ``rank(group, channel)`` when given (the random baseline). Each of the
    first ``max_rounds`` rounds drops neurons worth the excess in marginals, later rounds one neuron
    each; the plan returned is always one whose increase was measured to fit (or the empty plan).
    """
    def value(k: str, j: int) -> float:
        return rank(k, j) if rank is not None else float(scores[k].eigenvalues[j]) / marginal[k]

    items = sorted(((value(k, int(j)), k, int(j)) for k, v in plan.items() for j in v),
                   reverse=True)  # worst (least negative per cost) first
    rounds = 0
    while True:
        over = increase(plan) - budget
        if over <= 1e-9 * max(1.0, abs(budget)) or not items:
            return plan
        drop, freed = [], 0.0
        while items and (not drop or (freed < over and rounds < max_rounds)):
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
        rounds += 1


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






def record_widths(record: dict[str, Any]) -> list[int]:
    """The per-layer widths a table shows: the family's width list, else every splittable layer in graph order."""
    arch = record.get("architecture", {}).get("widths")
    if isinstance(arch, list):
        return arch
    widths = record.get("widths", {})
    return [widths[n] for n in record.get("layers", widths) if n in widths]


def stage_table(records: list[dict[str, Any]]) -> list[list[str]]:
    """Rows (header first) of the per-stage table the CLI prints and summary.md shows."""
    unit = records[0]["cost"]["unit"] if records else ""
    measured = any("measured" in r for r in records)
    baseline = any("width_mult" in r for r in records)
    rows = [["stage"] + (["width ×"] if baseline else []) + ["test top-1", "test loss", "MACs", "params",
                                                            f"cost ({unit})"]
            + (["measured ms"] if measured else []) + ["split", "widths"]]
    for r in records:
        row = [str(r["stage"])] + ([f"{r['width_mult']:g}"] if baseline else [])
        row += [f"{r['test_top1']:.4f}", f"{r['test_loss']:.4f}", fmt_si(r["macs"]), fmt_si(r["params"]),
                f"{r['cost']['value']:.4g}"]
        if measured:
            lat = (r.get("measured") or {}).get("latency_ms")
            row.append(f"{lat['median']:.4g}" if lat else "-")
        rows.append(row + [str(r.get("neurons_split", 0)), " ".join(str(w) for w in record_widths(r))])
    return rows


def write_summary(run: RunDir, config: GrowConfig, records: list[dict[str, Any]], *, status: str,
                  title: str | None = None, safe: bool = False) -> None:
    """summary.md: the settings, the stage table and the run's status (running, stopped: why, failed: why).

    ``safe=True`` (while handling another error) logs a failed write instead of raising it.
    """
    rows = stage_table(records)
    lines = [f"# hwsplit run: {title or f'{config.model} on {config.dataset}, cost {config.cost}'}", "",
             f"growth ratio {config.growth_ratio}, budget {config.budget}, {config.epochs} epochs per stage, "
             f"split by {config.split_method} ({config.split_epochs} epoch(s)), step {config.split_step}, "
             f"selection {config.selection}, seed {config.seed}", ""]
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "---|" * len(rows[0]))
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines.append(f"Status: {status}")
    lines.append("")
    lines.append("Load a stage: `hwsplit.checkpoint.load_model('stage-K.pt')`.")
    try:
        atomic_write_text(run.summary, "\n".join(lines) + "\n")
    except OSError as err:
        if not safe:
            raise WriteFailed(f"could not write {run.summary} ({err})") from err
        log.error("could not write %s: %s", run.summary, err)


__all__ = ["GrowConfig", "RunDir", "StageFailed", "build_seed", "grow", "load_config", "load_model", "parse_budget",
           "stage_table"]
