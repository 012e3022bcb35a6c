"""Fine-tune or retrain the stages of a grow run: the networks a user ships and the paper compares.

The paper's protocol (Wang et al. 2019, code ``main_finetune.py``) takes every grown checkpoint and
either fine-tunes it (continues from the grown weights) or retrains the architecture from scratch
(``--retrain``) on one long schedule, and trains every width-multiplier network from scratch on the
same schedule: what is compared is the architecture, not the per-stage schedule of the growth.

:func:`finetune` writes ``RUN/finetune/`` (or ``RUN/retrain/`` with ``from_scratch=True``) in the
run-directory format of :mod:`hwsplit.run.rundir`: ``config.json`` (the grow run's settings, with the
SGD overrides, plus ``"finetune"``: source, stages, epochs, from_scratch, the sha256 of each source
checkpoint), ``stages.jsonl`` (one record per source stage; ``"stage"`` is the record's index,
``"source_stage"`` the grown stage, by which tables name it, plus test and validation accuracy, MACs,
cost, measured cost and ``"epochs_in_all"``),
``stage-K.pt`` and ``summary.md``. Every file is written atomically and the directory is locked
against a second writer; running the same command again after a kill (even SIGKILL) continues after
the last completed record and redoes the interrupted one from its start (each record re-seeds from
the grow seed and its source stage, so the result is that of an uninterrupted run on the CPU).

:func:`final_network` is ``grow --final-epochs``: it picks the stage to ship (the last one, or with
a budget and a validation split the best on validation, never on test) and fine-tunes it into
``RUN/final/``. See docs/design.md §5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hwsplit.infra.distributed import is_main
from hwsplit.infra.errors import ConfigError
from hwsplit.infra.fsio import check_writable_name
from hwsplit.infra.parallel import on_main
from hwsplit.network.checkpoint import load_checkpoint, load_model
from hwsplit.network.models import model_from_architecture
from hwsplit.run.config import RUN_INFO_PREPROCESSING, GrowConfig, load_config, read_config, stage_epochs_in_all
from hwsplit.run.guard import guarded_records, kill_point
from hwsplit.run.rundir import RunDir, continue_or_start, file_sha256, write_summary
from hwsplit.run.session import Session, open_session, stage_seed
from hwsplit.run.stages import record_stage
from hwsplit.run.tblog import board_closed, open_board
from hwsplit.training.train import seed_everything

log = logging.getLogger(__name__)

#: Settings a fine-tuning may change from the grow run: SGD's, threads and TensorBoard (the data and its
#: validation split may not).
OVERRIDABLE = ("lr", "batch_size", "weight_decay", "device", "label_smoothing", "threads", "tensorboard")
FINETUNE_DIR, RETRAIN_DIR, FINAL_DIR = "finetune", "retrain", "final"
# the data order and initial weights of a fine-tuning of stage K come from seeds far from grow's
_SEED_OFFSET = 500


def finetune(run: str | Path, *, epochs: int, stages: Sequence[int] | None = None, from_scratch: bool = False,
             out: str | Path | None = None, overrides: dict[str, Any] | None = None, overwrite: bool = False,
             session: Session | None = None, progress: Callable | None = None,
             on_stage: Callable[[dict[str, Any]], None] | None = None, kind: str | None = None,
             chosen_by: str | None = None) -> list[dict[str, Any]]:
    """Fine-tune (or, ``from_scratch``, retrain) stages of the grow run ``run`` for ``epochs`` each.

    ``stages``: the grown stages (default: all completed ones). ``overrides``: SGD settings of
    :data:`OVERRIDABLE` replacing the run's (one cosine schedule of ``epochs`` at the run's ``lr``
    unless overridden). ``out`` defaults to ``RUN/finetune`` or ``RUN/retrain``. An ``out`` holding
    the same fine-tuning (same config.json) is continued; one holding another is replaced only with
    ``overwrite=True``. ``session``: an open session of the run's config (grow's own, for
    ``--final-epochs``). Returns the records. Raises ``ConfigError`` for bad stages or settings
    (before anything is written) and :class:`~hwsplit.run.rundir.StageFailed` when a record cannot
    complete (a non-finite loss, a failed write), after writing ``summary.md``.
    """
    src = RunDir(run)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs: expected a positive integer, got {epochs!r}")
    source_info = read_config(src.path)
    if source_info.get("finetune"):
        raise ConfigError(f"finetune: {src.path} is itself a fine-tuning; give the grow run it came from")
    config = load_config(src.path, purpose="finetune", accept=("prune",))
    bad = sorted(set(overrides or {}) - set(OVERRIDABLE))
    if bad:
        raise ConfigError(f"finetune: {', '.join(bad)} cannot change from the grow run (only {', '.join(OVERRIDABLE)})")
    config = dataclasses.replace(config, **(overrides or {}))
    records = src.records()
    done = {r["stage"]: r for r in records if isinstance(r.get("stage"), int) and src.checkpoint(r["stage"]).exists()}
    if not done:
        raise ConfigError(f"finetune: {src.path} has no completed stage (no record with its checkpoint)")
    chosen = sorted(done) if stages is None else list(stages)
    missing = [k for k in chosen if k not in done]
    if missing or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"stage: {', '.join(map(str, missing)) or chosen} not among the completed stages of "
                          f"{src.path} ({', '.join(map(str, sorted(done)))}), or given twice")
    kind = kind or (RETRAIN_DIR if from_scratch else FINETUNE_DIR)
    dest = RunDir(out if out is not None else finetune_dir(src.path, kind=kind))
    check_writable_name(dest.summary)
    if session is None:
        session = open_session(config)
    # the fingerprint of each source stage: a replaced grow run is neither continued nor shown with its
    # fine-tunings (hwsplit.run.rundir.check_source)
    digests = {str(k): file_sha256(src.checkpoint(k)) for k in chosen}
    info = {**config.to_dict(), "finetune": {"source": str(src.path.resolve()), "stages": chosen, "epochs": epochs,
                                             "from_scratch": bool(from_scratch), "kind": kind,
                                             "schedule": f"{config.schedule} over {epochs} epochs",
                                             **({"chosen_by": chosen_by} if chosen_by else {}),
                                             # a pruning baseline's stages (hwsplit.run.prune), not grown ones
                                             **({"source_baseline": source_info["baseline"]}
                                                if source_info.get("baseline") else {}),
                                             "source_architectures": [done[k].get("architecture") for k in chosen],
                                             "source_sha256": digests,
                                             "source_in_parent": dest.path.resolve().parent == src.path.resolve()},
            RUN_INFO_PREPROCESSING: session.preprocessing}
    # under torchrun every rank trains (train_and_record is data-parallel) and rank 0 alone writes dest
    # (write_stage, write_summary and the start below); the source run is read by every rank
    with dest.lock(kind) if is_main() else contextlib.nullcontext():
        kept = on_main(continue_or_start, dest, info, overwrite=overwrite, share=True)
        return _train_all(dest, src, config, session, chosen, done, kept, epochs=epochs, from_scratch=from_scratch,
                          kind=kind, progress=progress, on_stage=on_stage, digests=digests)


def _train_all(dest: RunDir, src: RunDir, config: GrowConfig, session: Session, chosen: list[int],
               done: dict[int, dict[str, Any]], records: list[dict[str, Any]], *, epochs: int, from_scratch: bool,
               kind: str, progress: Callable | None,
               on_stage: Callable[[dict[str, Any]], None] | None,
               digests: dict[str, str] | None = None) -> list[dict[str, Any]]:
    title = f"{kind} of {src.path.name}: stages {', '.join(map(str, chosen))}, {epochs} epochs"
    index = len(records)
    board = open_board(dest, config, records)
    with board_closed(board), guarded_records(dest, config, records, where=lambda: (index, f"stage {chosen[index]}"),
                                              noun="record", resume="run the same command again to continue",
                                              title=title):
        for index in range(len(records), len(chosen)):
            k = chosen[index]
            kill_point(f"{kind}-{index}:start")
            seed_everything(stage_seed(config, _SEED_OFFSET + k))
            if from_scratch:  # the architecture only: fresh weights from a seeded initialisation
                arch = load_checkpoint(src.checkpoint(k))["architecture"]
                model = model_from_architecture(arch).to(session.device)
            else:
                model = load_model(src.checkpoint(k)).to(session.device)
            source = done[k]
            # what found the source network counts too: a pruned one's wide network ("search_epochs")
            search = source.get("search_epochs", 0)
            had = source.get("epochs_in_all", stage_epochs_in_all(config, k))
            extra = {"source_stage": k, "from_scratch": bool(from_scratch), "epochs": epochs,
                     "epochs_in_all": search + epochs if from_scratch else had + epochs,
                     **_samples_in_all(source, session, epochs, from_scratch),
                     "source_test_top1": source.get("test_top1"), "source_val_top1": source.get("val_top1"),
                     "split": {}, "neurons_split": source.get("neurons_split", 0),
                     **({"source_sha256": digests[str(k)]} if digests else {})}

            def announce(record: dict[str, Any], k: int = k, source: dict[str, Any] = source) -> None:
                log.info("%s of stage %d: test top-1 %.4f (grown: %.4f)", kind, k, record["test_top1"],
                         source.get("test_top1", float("nan")))

            record_stage(dest, session, model, index, records, config=config, epochs=epochs,
                         loader_epoch=(_SEED_OFFSET + k) * 10_000, extra=extra, title=title, board=board,
                         progress=progress, announce=announce, on_stage=on_stage)
    write_summary(dest, config, records, status="done", title=title)
    return records


def _samples_in_all(source: dict[str, Any], session: Session, epochs: int, from_scratch: bool) -> dict[str, Any]:
    """``train_samples_in_all`` of a record whose source has one (a pruned network): the source's (only
    its ``search_train_samples`` when retrained from scratch) plus this training's sample passes."""
    if "train_samples_in_all" not in source:
        return {}
    before = source.get("search_train_samples", 0) if from_scratch else source["train_samples_in_all"]
    return {"train_samples_in_all": before + epochs * len(session.bundle.train)}


def finetune_dir(run: str | Path, *, from_scratch: bool = False, kind: str | None = None) -> Path:
    """Where :func:`finetune` writes when given no ``out``: ``RUN/finetune``, ``RUN/retrain`` with
    ``from_scratch``, or ``RUN/<kind>``."""
    return Path(run) / (kind or (RETRAIN_DIR if from_scratch else FINETUNE_DIR))


def ship_stage(config: GrowConfig, records: Sequence[dict[str, Any]]) -> tuple[int, str]:
    """The stage ``grow --final-epochs`` ships, and why: the last one; with a budget and a validation
    split, the one with the best validation accuracy among those within the budget (earliest on ties)."""
    last = records[-1]["stage"]
    if config.budget is None or not all("val_top1" in r for r in records):
        return last, "the last stage"
    within = [r for r in records if r["cost"]["value"] <= config.budget * (1 + 1e-9)] or list(records)
    best = max(within, key=lambda r: (r["val_top1"], -r["stage"]))
    return best["stage"], f"best validation top-1 ({best['val_top1']:.4f}) within the budget"


def final_network(run: str | Path, config: GrowConfig, session: Session, records: Sequence[dict[str, Any]], *,
                  progress: Callable | None = None) -> dict[str, Any]:
    """``grow --final-epochs``: train the stage to ship into ``RUN/final/`` — its grown weights fine-tuned, or
    with ``config.final_init == "fresh"`` its architecture retrained from a fresh initialisation; its record."""
    assert config.final_epochs is not None
    stage, why = ship_stage(config, records)
    fresh = config.final_init == "fresh"
    log.info("final network: stage %d (%s), %s %d epochs", stage, why,
             "retrained from a fresh initialisation" if fresh else "fine-tuned", config.final_epochs)
    out = finetune(run, epochs=config.final_epochs, stages=[stage], from_scratch=fresh, kind=FINAL_DIR,
                   session=session, progress=progress, chosen_by=why, overwrite=True)
    return out[-1]


__all__ = ["FINAL_DIR", "FINETUNE_DIR", "OVERRIDABLE", "RETRAIN_DIR", "final_network", "finetune", "finetune_dir",
           "ship_stage"]
