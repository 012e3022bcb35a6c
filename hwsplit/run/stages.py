"""One stage of every command that trains networks into a run directory: train and record, durably.

:func:`train_and_record` trains a model (resuming its training state from ``partial-K.pt``) and describes
it as a stage record; :func:`write_stage` makes the stage durable (checkpoint, then record);
:func:`record_stage` is the record step the stage loop (:mod:`hwsplit.run.grow`), fine-tuning, the width
and pruning baselines share. What a stage uses is the :class:`~hwsplit.run.session.Session`. See
docs/design.md §5.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.infra.distributed import is_main, world_size
from hwsplit.infra.errors import first_line
from hwsplit.infra.fsio import atomic_write
from hwsplit.infra.parallel import on_main
from hwsplit.network.checkpoint import save_checkpoint
from hwsplit.network.graph import NeuronGroup
from hwsplit.network.models import architecture
from hwsplit.run.guard import kill_point
from hwsplit.run.rundir import RunDir, WriteFailed, write_summary
from hwsplit.run.session import Progress, Session, describe
from hwsplit.training.train import TrainConfig, evaluate, train

log = logging.getLogger(__name__)


def _load_partial(path: Path, model: nn.Module, tc: TrainConfig) -> dict[str, Any] | None:
    """The training state in ``path`` if it belongs to this training (same architecture and schedule)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: start the training over
        log.warning("%s: unreadable (%s); training this stage from its first epoch", path, type(err).__name__)
        return None
    if state.get("architecture") != architecture(model) or state.get("train_config") != asdict(tc):
        log.warning("%s: saved for another network or schedule; training this stage from its first epoch", path)
        return None
    return state


def _epoch_saver(path: Path, model: nn.Module, tc: TrainConfig, stage: int) -> Callable[..., None]:
    """``on_epoch`` hook of :func:`train` that keeps the training state in ``path`` (rank 0 writes)."""
    arch = architecture(model)

    def save(stats: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        if stats["epoch"] + 1 >= tc.epochs:  # the stage checkpoint follows at once
            return
        if is_main():
            payload = {**state(), "architecture": arch, "train_config": asdict(tc)}
            try:
                atomic_write(path, lambda f: torch.save(payload, f), binary=True)
            except (OSError, RuntimeError) as err:  # losing a partial costs time, never the run
                log.warning("could not save the training state to %s (%s)", path, first_line(err))
        kill_point(f"stage-{stage}:epoch-{stats['epoch']}")

    return save


def train_and_record(session: Session, model: nn.Module, stage: int, *, epochs: int, loader_epoch: int,
                     timings: dict[str, float], extra: dict[str, Any], progress: Progress | None = None,
                     groups: list[NeuronGroup] | None = None,
                     train_config: TrainConfig | None = None, partial: Path | None = None,
                     on_epoch: Callable[..., None] | None = None,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Train ``model`` for ``epochs`` (data order from ``loader_epoch`` on), evaluate, describe: the record.

    ``partial``: where the training state is kept after every epoch (a run's ``partial-K.pt``); when it
    holds a state of this same network and schedule, the training resumes after its last epoch, to the
    weights an uninterrupted training gives (on the CPU). ``on_epoch(stats)`` is called after every epoch.

    ``groups`` are ``model``'s neuron groups if already traced (training does not change them).
    ``train_config`` replaces the run's one cosine schedule of ``epochs`` (e.g. a post-split policy's,
    :mod:`hwsplit.training.schedule`); its peak ``lr``, warm-up and horizon go into the record's ``"schedule"``.
    ``loss_fn`` replaces the training loss (e.g. network slimming's penalty, :mod:`hwsplit.run.prune`);
    the record's ``train_loss`` is then that loss. With a validation split the record has
    ``val_loss``/``val_top1``; ``test_samples`` (and ``val_samples``) count the images the accuracies
    are over, for standard errors.
    """
    config, device = session.config, session.device
    t0 = time.perf_counter()
    tc = config.train_config(epochs) if train_config is None else train_config
    resume = _load_partial(partial, model, tc) if partial is not None else None
    done = resume["epochs_done"] if resume else 0
    if hasattr(session.train_loader, "set_epoch"):
        session.train_loader.set_epoch(loader_epoch + done)  # the shuffles depend on the stage and epoch only
    saver = _epoch_saver(partial, model, tc, stage) if partial is not None else None

    def hook(stats: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        if on_epoch is not None:  # first: what it reports of an epoch is out before the state that skips it
            on_epoch(stats)
        if saver is not None:
            saver(stats, state)

    fit = train(model, session.train_loader, config=tc, device=device, progress=progress, on_epoch=hook,
                resume=resume, loss_fn=loss_fn)
    timings["train_s"] = time.perf_counter() - t0
    test = evaluate(model, session.test_loader, device=device, progress=progress)
    val = (evaluate(model, session.val_loader, device=device, progress=progress)
           if session.val_loader is not None else None)
    info = describe(session, model, groups)
    record = {
        "stage": stage,
        **info,
        "train_loss": fit["loss"], "train_top1": fit["top1"],
        "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
        "test_samples": test["samples"],
        **({"val_loss": val["loss"], "val_top1": val["top1"], "val_samples": val["samples"]} if val else {}),
        "schedule": {"epochs": tc.epochs, "lr": tc.lr, "kind": tc.schedule, "warmup_epochs": tc.warmup_epochs,
                     "horizon_epochs": tc.horizon_epochs or tc.epochs, "offset_epochs": tc.offset_epochs},
        "seconds": timings,
        "world_size": world_size(),
        "threads": torch.get_num_threads(),
        **extra,
    }
    if session.measure is not None:  # rank 0 alone, the others idle at a barrier: no training beside it
        measured = on_main(session.measure, model, session.input_shape)
        if is_main():
            record["measured"] = measured
    return record


def write_stage(run: RunDir, session: Session, model: nn.Module, record: dict[str, Any],
                records: list[dict[str, Any]]) -> None:
    """Checkpoint, then record (the record is what makes the stage complete); appends to ``records``.

    Only rank 0 writes; every rank appends (the records steer the stage loop on all of them).
    """
    stage = record["stage"]
    path = run.checkpoint(stage)
    if not is_main():
        kill_point(f"stage-{stage}:checkpoint")
        records.append(record)
        kill_point(f"stage-{stage}:record")
        return
    try:
        save_checkpoint(path, model, stage=stage, extra={"test_top1": record["test_top1"],
                                                         "input_shape": list(session.input_shape),
                                                         "preprocessing": session.preprocessing})
        kill_point(f"stage-{stage}:checkpoint")
        run.write_records(records + [record])
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        raise WriteFailed(f"could not write stage {stage} to {run.path} ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err
    records.append(record)
    with contextlib.suppress(OSError):
        run.partial(stage).unlink(missing_ok=True)  # the stage is durable: its training state is spent
    kill_point(f"stage-{stage}:record")


def record_stage(run: RunDir, session: Session, model: nn.Module, index: int, records: list[dict[str, Any]], *,
                 config: Any, epochs: int, loader_epoch: int, extra: dict[str, Any], title: str | None = None,
                 timings: dict[str, float] | None = None, train_config: TrainConfig | None = None,
                 groups: list[NeuronGroup] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 board: Any = None, scores: dict[str, Any] | None = None, progress: Progress | None = None,
                 announce: Callable[[dict[str, Any]], None] | None = None,
                 on_stage: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The record step every loop that writes a run shares (grow, finetune, the width and pruning baselines):
    train ``model`` as record ``index`` (:func:`train_and_record`, its training state kept in ``run``'s
    ``partial-K.pt``), make it durable (:func:`write_stage`), write ``summary.md`` (``running``, with
    ``config``'s settings and ``title``), then tell the TensorBoard ``board`` (with the splitting indices
    ``scores`` the stage grew on), ``announce(record)`` (the loop's log line) and, on rank 0, ``on_stage(record)``.
    Appends the record to ``records`` and returns it."""
    record = train_and_record(session, model, index, epochs=epochs, loader_epoch=loader_epoch,
                              timings={} if timings is None else timings, extra=extra, progress=progress,
                              groups=groups, train_config=train_config, partial=run.partial(index),
                              on_epoch=None if board is None else board.epoch, loss_fn=loss_fn)
    write_stage(run, session, model, record, records)
    write_summary(run, config, records, status="running", title=title)
    if board is not None:
        board.stage(record, scores)
    if announce is not None:
        announce(record)
    if on_stage is not None and is_main():
        on_stage(record)
    return record


__all__ = ["record_stage", "train_and_record", "write_stage"]
