"""Parametric descent: SGD training and evaluation of a classifier.

The caller puts the model on its device; batches are moved there here. Mixed precision (autocast to
float16 with a GradScaler) is used on CUDA only; channels-last memory format is used on CUDA and, for networks
with 2-D convolutions, on the CPU too (docs/design.md §5 has the measurement behind that default). On the CPU,
two runs from the same seed, initial weights and loader seed give identical weights, and a training resumed
from the state :func:`train` hands to ``on_epoch`` gives the same weights as one never interrupted.

Every cross-batch sum (loss, correct predictions, sample counts) goes through :func:`reduce_sum`, the
one place that adds the partial sums of all ranks under ``torch.distributed``. Under a process group
:func:`train` wraps the model in ``DistributedDataParallel`` (built anew at every call, so after every
split), decides on a non-finite loss on all ranks together, and averages the BatchNorm running
statistics over ranks after every epoch (:mod:`hwsplit.infra.distributed`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hwsplit.infra.distributed import all_ranks_true, average_buffers, data_parallel, reduce_sum
from hwsplit.infra.errors import first_line

__all__ = [
    "TrainConfig",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "seed_everything",
    "train",
    "train_epoch",
]

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, int], Iterable]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_SCHEDULES = ("cosine", "step", "constant")


@dataclass(kw_only=True)
class TrainConfig:
    """Hyper-parameters of SGD training.

    Attributes:
        epochs: passes over the training loader (>= 1).
        lr: peak learning rate (per unit loss gradient; > 0).
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 coefficient (>= 0), applied to weights only, not to biases or normalisation
            parameters (any parameter with fewer than 2 dimensions).
        nesterov: Nesterov momentum (needs momentum > 0).
        schedule: ``"cosine"`` (to 0 over all steps), ``"step"`` (times ``gamma`` every ``step_size``
            epochs) or ``"constant"``; applied per optimisation step.
        step_size: epochs between decays of the step schedule (>= 1).
        gamma: decay factor of the step schedule, in (0, 1].
        label_smoothing: cross-entropy label smoothing in [0, 1).
        amp: float16 autocast + GradScaler; ``None``: on when the device is CUDA (``True`` needs CUDA).
        channels_last: channels-last memory format for model and inputs during training; ``None``: on for
            CUDA, and on the CPU when the model has a ``Conv2d`` (docs/design.md §5, "Training on the CPU").
        warmup_epochs: linear warm-up of the learning rate from ~0 to ``lr`` over this many epochs
            (fractions allowed; 0: none), multiplied onto the schedule.
        horizon_epochs, offset_epochs: the cosine runs over ``horizon_epochs`` (default ``epochs``)
            and this training starts ``offset_epochs`` into it: one schedule across several calls
            (hwsplit.training.schedule's ``continue`` policy). ``offset_epochs + epochs`` must not exceed it.
    """

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    amp: bool | None = None
    channels_last: bool | None = None
    warmup_epochs: float = 0.0
    horizon_epochs: int | None = None
    offset_epochs: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", "must be an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a finite number > 0")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise bad("momentum", "must be in [0, 1)")
        if not (
            isinstance(self.weight_decay, (int, float))
            and math.isfinite(self.weight_decay)
            and self.weight_decay >= 0
        ):
            raise bad("weight_decay", "must be a finite number >= 0")
        if self.nesterov and self.momentum == 0:
            raise bad("nesterov", "needs momentum > 0")
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(_SCHEDULES)}")
        if isinstance(self.step_size, bool) or not isinstance(self.step_size, int) or self.step_size < 1:
            raise bad("step_size", "must be an integer >= 1 (epochs)")
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise bad("gamma", "must be in (0, 1]")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1):
            raise bad("label_smoothing", "must be in [0, 1)")
        if not (isinstance(self.warmup_epochs, (int, float)) and math.isfinite(self.warmup_epochs)
                and 0 <= self.warmup_epochs <= self.epochs):
            raise bad("warmup_epochs", "must be a number in [0, epochs]")
        if isinstance(self.offset_epochs, bool) or not isinstance(self.offset_epochs, int) or self.offset_epochs < 0:
            raise bad("offset_epochs", "must be an integer >= 0")
        if self.horizon_epochs is not None and (
                isinstance(self.horizon_epochs, bool) or not isinstance(self.horizon_epochs, int)
                or self.horizon_epochs < self.offset_epochs + self.epochs):
            raise bad("horizon_epochs", "must be an integer >= offset_epochs + epochs")
        for name in ("amp", "channels_last"):
            if getattr(self, name) not in (None, True, False):
                raise bad(name, "must be True, False or None (auto: on for CUDA)")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with ``config``'s momentum; weight decay on weights (>= 2-D parameters) only.

    Biases and BatchNorm/LayerNorm scales and shifts (1-D parameters) get no weight decay: shrinking
    them does not regularise the function and interferes with normalisation.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model: has no trainable parameters")
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


@dataclass
class _LRFactor:
    """Learning-rate multiplier at optimisation step ``t`` (a plain object so schedulers' state saves)."""

    schedule: str
    total_steps: int
    steps_per_epoch: int
    step_size: int
    gamma: float
    warmup_steps: float = 0.0
    offset_steps: int = 0

    def __call__(self, t: int) -> float:
        warm = min(1.0, (t + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        g = t + self.offset_steps  # position in a schedule shared with earlier trainings
        if self.schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(g, self.total_steps) / self.total_steps))
        if self.schedule == "step":
            return warm * self.gamma ** ((g // self.steps_per_epoch) // self.step_size)
        return warm


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate schedule of ``config.schedule``, to be stepped once per optimisation step.

    ``steps_per_epoch`` is the number of batches per epoch; cosine decays from ``lr`` to 0 over
    ``horizon_epochs`` (default ``epochs``) × ``steps_per_epoch`` steps, starting ``offset_epochs``
    in; step multiplies by ``gamma`` every ``step_size`` epochs; a linear warm-up over
    ``warmup_epochs`` multiplies either.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
    horizon = config.epochs if config.horizon_epochs is None else config.horizon_epochs
    factor = _LRFactor(
        config.schedule, horizon * steps_per_epoch, steps_per_epoch, config.step_size, config.gamma,
        warmup_steps=config.warmup_epochs * steps_per_epoch, offset_steps=config.offset_epochs * steps_per_epoch,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _no_progress(iterable: Iterable, desc: str, total: int) -> Iterable:
    return iterable


def _to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    if channels_last and x.ndim == 4:
        x = x.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    else:
        x = x.to(device, non_blocking=non_blocking)
    return x, y.to(device, non_blocking=non_blocking)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _resolve_flags(config: TrainConfig, device: torch.device, model: nn.Module) -> tuple[bool, bool]:
    cuda = device.type == "cuda"
    amp = cuda if config.amp is None else config.amp
    if amp and not cuda:
        raise ValueError(f"amp: mixed precision needs a CUDA device, got {device}")
    channels_last = (cuda or _has_conv2d(model)) if config.channels_last is None else config.channels_last
    return amp, channels_last


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: str | torch.device,
    loss_fn: LossFn,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: Progress | None = None,
    epoch: int = 0,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, Any]:
    """One pass over ``loader`` in training mode.

    ``scheduler`` (if any) is stepped after every optimisation step. ``scaler`` (float16 AMP on CUDA)
    scales the loss; ``amp`` turns on autocast. ``loss_fn(logits, labels)`` must return the batch mean.

    Returns ``{"epoch", "loss": mean training loss per sample, "top1": training accuracy as a fraction,
    "samples", "lr": learning rate at the end of the epoch, "seconds"}``.

    Raises:
        FloatingPointError: the loss of a batch is not finite (names epoch and batch index).
    """
    device = torch.device(device)
    wrap = progress or _no_progress
    total = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for i, (x, y) in enumerate(wrap(loader, f"train {epoch}", total)):
        x, y = _to_device(x, y, device, channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if not all_ranks_true(torch.isfinite(loss)):  # every rank stops at the same batch
            raise FloatingPointError(
                f"training loss is {loss.item()} at epoch {epoch}, batch {i}: lower the learning rate "
                "or check the inputs"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        loss_sum += loss.detach().to(torch.float64) * n
        correct += (logits.detach().argmax(dim=1) == y).sum()
        count += n
    loss_total, correct_total, n_total = reduce_sum(loss_sum, correct, float(count))
    if n_total == 0:
        raise ValueError("loader: yielded no training batches")
    return {
        "epoch": epoch,
        "loss": loss_total / n_total,
        "top1": correct_total / n_total,
        "samples": int(n_total),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "seconds": time.perf_counter() - start,
    }


def train(
    model: nn.Module,
    loader: Iterable,
    *,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    loss_fn: LossFn | None = None,
    on_epoch: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (already on ``device``) for ``config.epochs`` passes over ``loader``.

    ``loss_fn`` defaults to cross entropy with ``config.label_smoothing``. ``progress``, if given, wraps
    each epoch's batches (``progress(iterable, desc, total)``, e.g. a tqdm bar). The model is returned
    to its previous train/eval mode; channels-last is used while training and, on the CPU, the
    parameters are returned to the contiguous format afterwards (on CUDA they stay channels-last).

    ``on_epoch(stats, state)`` is called after every epoch with that epoch's stats (see
    :func:`train_epoch`) and a function returning the training state as plain tensors and numbers
    (``{"epochs_done", "model", "optimizer", "scheduler", "scaler", "epochs", "rng"}``, on the CPU, to
    save as a checkpoint). Passing such a state as ``resume`` continues the training after its last
    epoch: ``model`` must have the architecture it was saved from, and the loader must yield what it
    would have yielded for the remaining epochs (the caller sets a seeded loader's epoch).

    Returns ``{"loss": mean training loss of the last epoch, "top1": training accuracy (fraction) of
    the last epoch, "epochs": per-epoch dicts (see :func:`train_epoch`), "seconds": wall time of this
    call, "resumed_epochs": epochs taken from ``resume`` (0 without)}``.

    Raises:
        FloatingPointError: a non-finite training loss.
        ValueError: a ``resume`` state that does not fit ``config`` or ``model``.
    """
    device = torch.device(device)
    amp, channels_last = _resolve_flags(config, device, model)
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    steps = len(loader)  # type: ignore[arg-type]
    if steps < 1:
        raise ValueError("loader: has no batches")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = data_parallel(model)  # a new DDP wrapper per call: the parameters change at every split
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler(device.type) if amp else None
    epochs: list[dict[str, Any]] = []
    first = 0
    if resume is not None:
        first = _restore(resume, model, optimizer, scheduler, scaler, config)
        epochs = [dict(e) for e in resume.get("epochs", [])]
        log.info("resuming training after epoch %d of %d", first, config.epochs)

    def state() -> dict[str, Any]:
        return {
            "epochs_done": len(epochs),
            "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            "optimizer": _cpu(optimizer.state_dict()),
            "scheduler": copy.deepcopy(scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epochs": [dict(e) for e in epochs],
            "rng": torch.get_rng_state(),
        }

    was_training = model.training
    start = time.perf_counter()
    log.debug("training %d epochs of %d steps: %s", config.epochs, steps, asdict(config))
    try:
        for epoch in range(first, config.epochs):
            stats = train_epoch(
                net,
                loader,
                optimizer,
                device=device,
                loss_fn=loss_fn,
                scaler=scaler,
                scheduler=scheduler,
                progress=progress,
                epoch=epoch,
                amp=amp,
                channels_last=channels_last,
            )
            average_buffers(model)  # every rank evaluates and scores with the same BatchNorm statistics
            epochs.append(stats)
            log.info(
                "epoch %d: loss %.4f, train top1 %.4f, lr %.4g, %.1f s",
                epoch,
                stats["loss"],
                stats["top1"],
                stats["lr"],
                stats["seconds"],
            )
            if on_epoch is not None:
                on_epoch(stats, state)
    finally:
        model.train(was_training)
        if channels_last and device.type != "cuda":
            model.to(memory_format=torch.contiguous_format)
    return {
        "loss": epochs[-1]["loss"],
        "top1": epochs[-1]["top1"],
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
        "resumed_epochs": first,
    }


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (an optimizer's state dict, for a checkpoint)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
             config: TrainConfig) -> int:
    """Load a state from :func:`train`'s ``on_epoch`` into the fresh objects; the number of epochs done."""
    done = state.get("epochs_done")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= config.epochs:
        raise ValueError(f"resume: epochs_done must be an integer in [0, {config.epochs}], got {done!r}")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"resume: the saved weights do not fit the model ({first_line(err)})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if state.get("rng") is not None:
        torch.set_rng_state(state["rng"])
    return done


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device = "cpu",
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
    amp: bool | None = None,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` (already on ``device``) over ``loader``, in eval mode.

    ``loss_fn`` (batch mean) defaults to plain cross entropy. ``amp``: float16 autocast, ``None`` means
    on for CUDA. The model is returned to its previous train/eval mode.

    Returns ``{"loss": mean loss per sample, "top1": accuracy as a fraction 0..1, "top5": top-k
    accuracy with k = min(5, number of classes), "samples": number of samples}``.
    """
    device = torch.device(device)
    use_amp = device.type == "cuda" if amp is None else amp
    if use_amp and device.type != "cuda":
        raise ValueError(f"amp: mixed precision needs a CUDA device, got {device}")
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss()
    wrap = progress or _no_progress
    total = len(loader) if hasattr(loader, "__len__") else 0  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for x, y in wrap(loader, "eval", total):
            x, y = _to_device(x, y, device, channels_last=False)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
            logits = logits.float()
            n = y.shape[0]
            loss_sum += loss_fn(logits, y).to(torch.float64) * n
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == y[:, None]  # (B, k); column 0 is the argmax
            top1 += hits[:, 0].sum()
            top5 += hits.any(dim=1).sum()
            count += n
    finally:
        model.train(was_training)
    loss_total, top1_total, top5_total, n_total = reduce_sum(loss_sum, top1, top5, float(count))
    if n_total == 0:
        raise ValueError("loader: yielded no evaluation batches")
    return {
        "loss": loss_total / n_total,
        "top1": top1_total / n_total,
        "top5": top5_total / n_total,
        "samples": int(n_total),
    }
