"""The stage loop (docs/design.md §5):

    stage 0: train the seed
    stage k: marginal costs on the current architecture → budget → splitting indices (every image, or
             an adaptive subsample that stops on the knapsack's cut) → selection (by name,
             hwsplit.splitting.select.SELECTIONS) → fit the plan to the budget → split → train

The price → score → select → split part of a stage is :meth:`hwsplit.run.grower.Grower.grow_step`, the
same step a user's own training loop calls (``Grower.step``); this module adds the run directory,
seeding, training, records, resume and TensorBoard (:mod:`hwsplit.run.tblog`).

The run directory's format is :mod:`hwsplit.run.rundir`'s; what a stage shares with the other
commands is the session (:mod:`hwsplit.run.session`), the record step (training, recording, durable writes:
:mod:`hwsplit.run.stages`) and the failure bookkeeping (:mod:`hwsplit.run.guard`); the settings are a
:class:`~hwsplit.run.config.GrowConfig`.

**Determinism and resume.** Each stage starts from the previous stage's weights (in memory, or
read back from ``stage-K.pt``) and re-seeds every random number generator with
:func:`~hwsplit.run.session.stage_seed`; its data order comes from loader epochs derived from the stage
number and its Rayleigh-quotient start from ``seed + stage``. Nothing random carries over from one
stage to the next, so a run resumed after a crash at any moment (``grow(..., resume=True)``)
continues after its last completed stage and ends, on the CPU, with the same per-stage
architectures and weights as an uninterrupted run. A checkpoint without a record is redone.

**One trace per stage.** The model's neuron groups are traced once after each split (or for the
seed) and passed to the record, the next stage's scoring and the cost model's marginals, so all
three see the same group names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.infra.distributed import is_main, world_size
from hwsplit.infra.errors import ConfigError
from hwsplit.infra.fsio import atomic_write_json, check_writable_name
from hwsplit.infra.parallel import on_main
from hwsplit.network.checkpoint import load_checkpoint
from hwsplit.network.families import width_ceilings
from hwsplit.network.models import model_from_architecture
from hwsplit.run.config import (
    RUN_INFO_PREPROCESSING,
    RUN_INFO_WORLD_SIZE,
    GrowConfig,
    load_config,
    stage_epochs_in_all,
)
from hwsplit.run.grower import Grower, GrowthStep
from hwsplit.run.guard import guarded_records, kill_point
from hwsplit.run.rundir import RunDir, WriteFailed, resolve_paths, start_fresh, write_summary
from hwsplit.run.session import Progress, Session, open_session, stage_seed
from hwsplit.run.stages import record_stage
from hwsplit.run.tblog import board_closed, open_board
from hwsplit.training.train import evaluate, seed_everything

log = logging.getLogger(__name__)

STOP_STAGES = "stages done"


def _resume_preflight(run: RunDir, config: GrowConfig) -> None:
    """Refuse a resume that cannot work, before anything in ``run`` is touched."""
    if not run.config.exists():
        raise ConfigError(f"resume: {run.path} has no config.json (nothing to resume; start a new run)")
    saved = load_config(run.path)
    then, now = resolve_paths(saved.to_dict()), resolve_paths(config.to_dict())
    for name in then:
        if name not in ("stages", "threads") and then[name] != now[name]:
            raise ConfigError(f"resume: {name} differs from {run.config} ({getattr(saved, name)!r} there, "
                              f"{getattr(config, name)!r} here)")
    done = len(run.records()) - 1  # growth stages completed after the seed
    if config.stages < done:
        raise ConfigError(f"stages: {config.stages} is fewer than the {done} growth stage(s) {run.path} has "
                          "completed (--stages may only extend a run)")


def check_seed_cost(session: Session, model: nn.Module) -> float:
    """The seed's cost under the run's cost model; ``ConfigError`` when it cannot be right or when the
    budget leaves nothing to grow (both before anything is written)."""
    config, cost_model = session.config, session.cost_model
    total = cost_model.total(model, session.input_shape)
    source = f" from the profile {config.profile}" if config.profile else ""
    if not (math.isfinite(total) and total > 0):
        raise ConfigError(f"cost: the {cost_model.name} cost model{source} prices the seed network at {total:.4g} "
                          f"{cost_model.unit}; a network cannot cost <= 0 (the profile does not fit networks "
                          "this small: profile the device again, or use --cost flops)")
    try:  # explicit per-layer ceilings must name every growing layer of this network
        width_ceilings(config.model, config.max_widths, [g.name for g in session.trace(model) if g.splittable])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.budget is not None and config.budget <= total:
        raise ConfigError(f"budget: {config.budget:.4g} {cost_model.unit} is not above the seed's own cost "
                          f"({total:.4g} {cost_model.unit}{source}); nothing could grow")
    return total


def grow(config: GrowConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
         progress: Progress | None = None, on_stage: Callable[[dict[str, Any]], None] | None = None,
         cost_model: Any = None) -> list[dict[str, Any]]:
    """Run the stage loop, writing the run directory ``out``; returns the stage records.

    ``resume=True`` continues the run in ``out`` after its last completed stage (``config`` must
    equal its config.json except for ``stages``, which may extend it); without it, a previous run
    in ``out`` is replaced only with ``overwrite=True``, and a directory that holds files of the
    run format but no hwsplit run is never touched. Every input (data, model, cost model and
    profile, the seed's cost against the budget, path lengths) is checked before anything in
    ``out`` is written, and ``out`` is locked against a second writer (:class:`~hwsplit.infra.errors.RunLocked`).
    ``progress`` wraps long loops (``progress(iterable, desc, total)``,
    e.g. tqdm); ``on_stage`` is called with each record as soon as the stage is on disk. ``cost_model``:
    the run's cost model if already built from ``config`` (:func:`hwsplit.run.options.grow_settings`).

    Raises :class:`~hwsplit.run.rundir.StageFailed` when a stage cannot complete — a non-finite training or scoring
    loss, or a failed write (disk full, permission) — after writing ``summary.md`` with the
    reason; the completed stages' checkpoints and records stay intact. ``KeyboardInterrupt``
    propagates after the same bookkeeping; no partial file is left behind.
    """
    run = RunDir(out)
    check_writable_name(run.summary)
    if config.data_dir is not None and not resume:  # resumable from any working directory
        config = dataclasses.replace(config, data_dir=str(Path(config.data_dir).resolve()))
    if resume:
        on_main(_resume_preflight, run, config)  # the run directory is rank 0's
    # the data, the model's family and the cost model's profile (with "auto", its channel_block) must load
    session = open_session(config, cost_model=cost_model)
    if not resume:
        seed_everything(stage_seed(config, 0))  # stage 0 re-seeds before it builds the same seed
        check_seed_cost(session, session.seed_network())
    # rank 0 alone locks and writes the run directory; the others get its records
    with run.lock("grow") if is_main() else contextlib.nullcontext():
        records = on_main(_prepare, run, config, resume=resume, overwrite=overwrite,
                          preprocessing=session.preprocessing, share=True)
        return _stages(run, config, session, records, progress=progress, on_stage=on_stage)


def _prepare(run: RunDir, config: GrowConfig, *, resume: bool, overwrite: bool,
             preprocessing: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Make the locked ``run`` ready (resumed or fresh), write config.json (the settings, the number of
    processes and the input the networks expect); the completed stages' records."""
    if resume:
        records = run.trim_to_completed()
    else:
        start_fresh(run, overwrite=overwrite)
        records = []
    try:
        atomic_write_json(run.config, {**config.to_dict(), RUN_INFO_WORLD_SIZE: world_size(),
                                       **({RUN_INFO_PREPROCESSING: preprocessing} if preprocessing else {})})
    except OSError as err:
        raise WriteFailed(f"could not write {run.config} ({err.strerror or err})") from None
    return records


def make_grower(config: GrowConfig, session: Session, model: nn.Module, *, first_step: int = 1,
                progress: Progress | None = None) -> Grower:
    """The :class:`~hwsplit.run.grower.Grower` of a run: ``config``'s growth settings, the session's cost
    model and device, the run's input shape."""
    return Grower(model, torch.zeros(session.input_shape, device=session.device), cost=session.cost_model,
                  growth_ratio=config.growth_ratio, budget=config.budget, selection=config.selection,
                  split_step=config.split_step, device=session.device, split_method=config.split_method,
                  split_epochs=config.split_epochs, split_lr=config.split_lr, split_vectors=config.split_vectors,
                  split_allocation=config.split_allocation, scoring=config.scoring,
                  scoring_tolerance=config.scoring_tolerance, scoring_z=config.scoring_z,
                  scoring_min=config.scoring_min, scoring_cap=config.scoring_cap,
                  split_candidates=config.split_candidates, max_layer_growth=config.max_layer_growth,
                  channel_multiple=session.channel_multiple, seed=config.seed, first_step=first_step,
                  price=config.price, group_budgets=config.group_budgets, max_widths=config.max_widths,
                  lp_threshold=config.lp_threshold, family=config.model, progress=progress)


#: The keys of a growth step's record (hwsplit.run.grower) that a stage record keeps, in this order.
STEP_KEYS = ("split", "neurons_split", "selection", "channel_multiple", "price", "group_budgets", "budget",
             "eigenvalues", "scoring_images", "scoring_decided", "scoring", "loss_before_split", "loss_after_split",
             "predicted_loss_change")


def _stages(run: RunDir, config: GrowConfig, session: Session, records: list[dict[str, Any]], *,
            progress: Progress | None, on_stage: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """The stage loop proper, on a locked, prepared run directory: the seed (:func:`_seed_stage`), then per
    stage price → score → select → split (:func:`_split_stage`, :meth:`Grower.grow_step`) → train → record
    (:func:`_record_stage`), until the stages are done, nothing can split or the budget is reached."""
    stop_reason = STOP_STAGES
    stage = len(records)
    board = open_board(run, config, records)
    grown = _resumed(run, config, session, stage, progress) if records else None
    with board_closed(board), guarded_records(run, config, records, where=lambda: (stage, f"stage {stage}"),
                                              noun="stage", prep="in",
                                              resume=f"continue with `grow --resume {run.path}`"):
        if stage == 0:
            grown = _seed_stage(run, config, session, records, board, progress=progress, on_stage=on_stage)
            stage = 1
        assert grown is not None
        first = stage
        for stage in range(first, config.stages + 1):
            step = _split_stage(config, session, grown, stage)
            if step.record is None:  # nothing split: no negative index, or no budget left
                stop_reason = step.stop_reason
                break
            grown = _Grown(grown.grower, step.model, step.groups)
            kill_point(f"stage-{stage}:split")
            _record_stage(run, config, session, records, board, grown, stage,
                          extra={k: step.record[k] for k in STEP_KEYS if k in step.record},
                          timings=dict(step.record["seconds"]), epochs=config.epochs, scores=step.scores,
                          progress=progress, on_stage=on_stage)
            if step.stop_reason is not None:  # the budget is reached
                stop_reason = step.stop_reason
                break

    write_summary(run, config, records, status=f"stopped: {stop_reason}")
    log.info("stopped: %s", stop_reason)
    if config.final_epochs is not None and records:  # the network to ship, in RUN/final/ (resumable)
        from hwsplit.run.finetune import final_network

        final_network(run.path, config, session, records, progress=progress)
    return records


@dataclasses.dataclass
class _Grown:
    """The network a stage grows from: its grower (the run's settings), the model and its traced groups."""

    grower: Grower
    model: nn.Module
    groups: list


def _resumed(run: RunDir, config: GrowConfig, session: Session, stage: int, progress: Progress | None) -> _Grown:
    """The last completed stage's network, read back (every rank continues from rank 0's checkpoint: its
    directory need not be shared)."""
    payload = on_main(load_checkpoint, run.checkpoint(stage - 1), share=True)
    model = model_from_architecture(payload["architecture"], payload["state_dict"]).eval().to(session.device)
    grower = make_grower(config, session, model, first_step=stage, progress=progress)
    log.info("resuming %s after stage %d", run.path, stage - 1)
    return _Grown(grower, model, grower.trace(model))


def _seed_stage(run: RunDir, config: GrowConfig, session: Session, records: list[dict[str, Any]], board: Any, *,
                progress: Progress | None, on_stage: Callable[[dict[str, Any]], None] | None) -> _Grown:
    """Stage 0: build the seed, train and record it."""
    seed_everything(stage_seed(config, 0))
    model = session.seed_network().to(session.device)
    grower = make_grower(config, session, model, progress=progress)
    seed = _Grown(grower, model, grower.trace(model))
    _record_stage(run, config, session, records, board, seed, 0, extra={"split": {}, "neurons_split": 0},
                  timings={}, epochs=config.seed_epochs or config.epochs, progress=progress, on_stage=on_stage)
    return seed


def _split_stage(config: GrowConfig, session: Session, grown: _Grown, stage: int) -> GrowthStep:
    """Stage ``stage``'s price → score → select → split (:meth:`Grower.grow_step`), re-seeded from the stage, on
    the stage's data order; the losses just before and after the split are the test set's."""
    seed_everything(stage_seed(config, stage))
    kill_point(f"stage-{stage}:start")
    if hasattr(session.train_loader, "set_epoch"):
        session.train_loader.set_epoch(stage * 10_000 - 1)
    return grown.grower.grow_step(grown.model, session.train_loader, stage=stage, groups=grown.groups,
                                  evaluate=lambda m: evaluate(m, session.test_loader, device=session.device)["loss"])


def _record_stage(run: RunDir, config: GrowConfig, session: Session, records: list[dict[str, Any]], board: Any,
                  grown: _Grown, stage: int, *, extra: dict[str, Any], timings: dict[str, float], epochs: int,
                  scores: dict[str, Any] | None = None, progress: Progress | None,
                  on_stage: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Train and record stage ``stage`` (:func:`~hwsplit.run.stages.record_stage`) with the stage's post-split
    schedule; the record counts every epoch the network has had (``epochs_in_all``)."""
    cost_model = session.cost_model

    def announce(record: dict[str, Any]) -> None:
        log.info("stage %d: test top-1 %.4f, %.4g MACs, %s %.4g %s", stage, record["test_top1"], record["macs"],
                 cost_model.name, record["cost"]["value"], cost_model.unit)

    return record_stage(run, session, grown.model, stage, records, config=config, epochs=epochs,
                        loader_epoch=stage * 10_000, timings=timings,
                        extra={**extra, "epochs_in_all": stage_epochs_in_all(config, stage)},
                        train_config=config.stage_train_config(stage), groups=grown.groups, board=board,
                        scores=scores, progress=progress, announce=announce, on_stage=on_stage)


__all__ = ["STEP_KEYS", "STOP_STAGES", "check_seed_cost", "grow", "make_grower"]
