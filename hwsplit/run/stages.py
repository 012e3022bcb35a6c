"""What every command that trains networks into a run directory shares: the session and one stage.

A :class:`Session` holds what all stages of a run use (data, loaders, device, cost models, the
end-to-end measurer); :func:`train_and_record` trains a model and describes it as a stage record;
:func:`write_stage` makes the stage durable (checkpoint, then record). The stage loop
(:mod:`hwsplit.run.grow`), the width baseline (:mod:`hwsplit.run.baselines`) and fine-tuning use them
alike. See docs/design.md §5.

**Determinism.** Each stage re-seeds every random number generator with :func:`stage_seed` and
draws its data order from loader epochs derived from the stage number, so a run resumed after a
crash continues, on the CPU, bit for bit as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cost_models
from hwsplit.infra.devices import apply_threads
from hwsplit.infra.distributed import is_main, local_device, rank, world_size
from hwsplit.infra.errors import ConfigError, first_line
from hwsplit.infra.fsio import atomic_write
from hwsplit.infra.parallel import on_main
from hwsplit.network.checkpoint import save_checkpoint
from hwsplit.network.families import build_seed as _build_family_seed
from hwsplit.network.graph import NeuronGroup, find_neuron_groups
from hwsplit.network.models import architecture
from hwsplit.run.config import GrowConfig, resolve_channel_multiple
from hwsplit.run.rundir import RunDir, StageFailed, WriteFailed, write_summary
from hwsplit.training.bundle import BadImageError, DataBundle, preprocessing, split_validation
from hwsplit.training.data import load_dataset
from hwsplit.training.loaders import make_eval_loader, make_loaders
from hwsplit.training.train import TrainConfig, evaluate, seed_everything, train

log = logging.getLogger(__name__)

Progress = Callable[[Iterable, str, int], Iterable]

# Test hook for crash-safety tests: SIGKILL the process at a named point ("stage-K:<point>").
KILL_AT_ENV = "HWSPLIT_KILL_AT"
#: With several processes, only the rank this names is killed (all of them when unset).
KILL_RANK_ENV = "HWSPLIT_KILL_RANK"


def kill_point(point: str) -> None:
    """SIGKILL this process when the environment variable HWSPLIT_KILL_AT names ``point`` (tests only)."""
    if os.environ.get(KILL_AT_ENV) == point and os.environ.get(KILL_RANK_ENV, str(rank())) == str(rank()):
        log.warning("%s=%s: killing this process", KILL_AT_ENV, point)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def failure_kind(err: BaseException) -> str:
    """What stopped a record: ``non-finite loss``, ``bad input image`` or ``write failed``."""
    return ("non-finite loss" if isinstance(err, FloatingPointError) else
            "bad input image" if isinstance(err, BadImageError) else "write failed")


@contextlib.contextmanager
def guarded_records(run: RunDir, config: Any, records: list[dict[str, Any]], *,
                    where: Callable[[], tuple[int, str]], noun: str, resume: str, prep: str = "at",
                    title: str | None = None) -> Iterator[None]:
    """The bookkeeping of every loop that writes records into a run (grow, finetune, the width
    baseline) when it stops early. ``where()`` names the record being made: ``(index, "stage 2")``.

    A non-finite loss, a bad input image or a failed write: ``summary.md`` gets the status
    ``failed <prep> <what> (<kind>): <error>`` and :class:`StageFailed` is raised, saying which
    ``noun``s are intact. Ctrl-C: the status says where it stopped and ``resume`` (how to continue),
    a second Ctrl-C is ignored while it is written, and the interrupt propagates."""
    try:
        yield
    except (FloatingPointError, WriteFailed, BadImageError) as err:
        index, what = where()
        kind = failure_kind(err)
        write_summary(run, config, records, status=f"failed {prep} {what} ({kind}): {err}", title=title, safe=True)
        kept = (f"{noun}s 0-{len(records) - 1} in {run.path} are intact" if records
                else f"no {noun} of {run.path} completed")
        raise StageFailed(f"{what} failed ({kind}): {first_line(err)}; {kept}", stage=index,
                          run=run.path) from None
    except KeyboardInterrupt:
        with ignoring_interrupts():  # a second Ctrl-C must not break the bookkeeping
            write_summary(run, config, records, status=f"interrupted {prep} {where()[1]}; {resume}", title=title,
                          safe=True)
        raise


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """Ignore SIGINT while the block runs (the bookkeeping after a first Ctrl-C); the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stage_seed(config: GrowConfig, stage: int) -> int:
    """The seed of every global random number generator at the start of ``stage``."""
    return config.seed * 1000 + stage


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_seed(config: GrowConfig, bundle: DataBundle, *, width_mult: float = 1.0) -> nn.Module:
    """The stage-0 model of ``config.model`` sized for ``bundle``'s inputs and classes.

    ``width_mult`` multiplies the configured width multiplier (the width baseline's scaling); with a
    channel multiple every growing width is rounded to it (make-divisible, hwsplit/splitting/blocks.py).
    """
    return _build_family_seed(config.model, config.model_options, bundle.input_shape, bundle.num_classes,
                              width_mult=width_mult, channel_multiple=resolve_channel_multiple(config))


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
    val_loader: Any = None  # with config.val_fraction > 0: the validation images, in order

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The input the run's networks expect (:func:`hwsplit.training.bundle.preprocessing`): layout, value range,
        mean/std."""
        return preprocessing(self.bundle)

    def trace(self, model: nn.Module) -> list[NeuronGroup]:
        """The neuron groups of ``model`` (one fx trace; pass the result on instead of tracing again)."""
        return find_neuron_groups(model, torch.zeros(self.input_shape, device=self.device))


def open_session(config: GrowConfig, *, bundle: DataBundle | None = None) -> Session:
    """Load the data and build the cost models of ``config`` (``bundle``: data already loaded).

    Under a process group the loaders are this rank's shards (``config.batch_size`` per rank) and
    a CUDA device is this rank's (``cuda:LOCAL_RANK``).
    """
    seed_everything(config.seed)
    apply_threads(config.threads)
    device = local_device(config.device)
    if bundle is None:
        bundle = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed,
                              limit=config.data_limit, test_limit=config.test_limit)
    if config.val_fraction > 0 and bundle.val is None:
        bundle = split_validation(bundle, config.val_fraction, seed=config.seed)
    train_loader, test_loader = make_loaders(bundle, batch_size=config.batch_size, seed=config.seed,
                                             rank=rank(), world_size=world_size(),
                                             device=device if device.type == "cuda" else None)
    return Session(config=config, bundle=bundle, train_loader=train_loader, test_loader=test_loader, device=device,
                   input_shape=(1, *bundle.input_shape), cost_model=_cost_model(config),
                   flops=cost_models.get_cost_model("flops"), measure=end_to_end_measurer(config),
                   val_loader=None if bundle.val is None else make_eval_loader(
                       bundle.val, batch_size=config.batch_size, seed=config.seed,
                       device=device if device.type == "cuda" else None))


def _cost_model(config: GrowConfig) -> Any:
    """The run's cost model; a profile that cannot be fitted is a ``ConfigError`` naming the file."""
    import numpy as np

    try:
        return cost_models.get_cost_model(config.cost, **config.cost_options)
    except (np.linalg.LinAlgError, ArithmeticError) as err:
        raise ConfigError(f"profile: {config.profile}: cannot fit the {config.cost} cost model to it "
                          f"({type(err).__name__}: {first_line(err)}); it is degenerate (too few distinct rows?)"
                          ) from None



def describe(session: Session, model: nn.Module, groups: list[NeuronGroup] | None = None) -> dict[str, Any]:
    """Architecture, widths, MACs, parameters and cost of ``model`` (the non-training part of a record)."""
    shape = session.input_shape
    groups = [g for g in (groups if groups is not None else session.trace(model)) if g.splittable]
    return {
        "architecture": architecture(model),
        "layers": [g.name for g in groups],
        "widths": {g.name: g.width for g in groups},
        "macs": session.flops.total(model, shape),
        "params": count_params(model),
        "cost": {"name": session.cost_model.name, "unit": session.cost_model.unit,
                 "value": session.cost_model.total(model, shape)},
    }


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


def end_to_end_measurer(config: GrowConfig) -> Callable[[nn.Module, tuple[int, ...]], dict[str, Any]] | None:
    """A function measuring a whole network as the profile's device measured its layers, or None.

    Uses the profile's backend, meter and threads on the device the profile was made on, when
    this machine has that kind of device; otherwise every stage records why it was not measured.
    A profile from another machine is allowed (that is what tables are for) and said so.
    """
    wanted = config.measure if config.measure is not None else config.profile is not None
    if not wanted:
        return None
    from cost_models.machine import cpu_name
    from cost_models.measure import measure_model
    from cost_models.meters import nvidia_gpu_available
    from cost_models.profile_io import load_profile

    if config.profile is None:
        backend, meter, kind, threads, name = "onnxruntime", "latency", "cpu", None, None
    else:
        profile = load_profile(config.profile)
        dev = profile.get("device", {})
        backend, meter = profile.get("backend", "onnxruntime"), profile.get("meter", "latency")
        kind, threads, name = dev.get("kind", "cpu"), dev.get("threads"), dev.get("name")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"profile: {config.profile}: device.kind {kind!r} is not one hwsplit can measure "
                          "(cpu or cuda)")
    here = cpu_name() if kind == "cpu" else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
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


__all__ = ["KILL_AT_ENV", "KILL_RANK_ENV", "Session", "build_seed", "count_params", "describe", "end_to_end_measurer",
           "failure_kind", "guarded_records", "ignoring_interrupts", "kill_point", "open_session", "record_stage",
           "stage_seed", "train_and_record", "write_stage"]
