"""TensorBoard event files of a run directory (``RUN/tb/``), next to its JSON records.

Every command that trains into a run directory (grow, its ``final/``, finetune, the width baseline)
writes, with ``GrowConfig.tensorboard`` on (``--no-tensorboard`` turns it off):

* per epoch: ``train/loss``, ``train/top1`` (a fraction), ``train/lr``;
* per stage (record): ``test/loss``, ``test/top1``, ``val/loss`` and ``val/top1`` with a validation
  split, ``stage/cost_<unit>`` (the cost model's total in its unit: MACs, ms, mJ, neurons),
  ``stage/macs``, ``stage/params``, ``stage/latency_ms`` (and ``stage/energy_mj``) where the stage was
  measured end to end, ``stage/neurons_split``, ``stage/index`` (the record's number), ``widths/<layer>``
  and, for a grown stage, the histogram ``lambda/<layer>`` of the splitting indices it was chosen on.

The x axis of everything is training epochs in the directory (a stage's scalars sit at its last epoch),
so training curves and stage results line up, and a resumed run hides what its interrupted stage had
written (``purge_step``: TensorBoard drops events at later epochs written before the restart; a
replaced run's event files are deleted with its other files, :func:`hwsplit.run.rundir.remove_run_files`).
``tensorboard --logdir runs`` shows every run directory under ``runs`` side by side.

Writing event files never fails a run: any error (an unwritable ``tb/``, a full disk) logs one
warning and turns the board off. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hwsplit.infra.distributed import is_main
from hwsplit.run.rundir import RunDir

log = logging.getLogger(__name__)

def epochs_of(records: list[dict[str, Any]]) -> int:
    """Training epochs the records' stages spent in this directory (their schedules' epochs)."""
    return sum(int(r.get("schedule", {}).get("epochs", 0)) for r in records)


def write_step(writer: Any, record: Mapping[str, Any], scores: Mapping[str, Any] | None, step: int) -> None:
    """A growth step's scalars on a ``SummaryWriter`` at ``step``: neurons split, widths per layer and
    a histogram of the splitting indices per layer (``scores``: ``{layer: SplitScore}``). Takes a
    stage record or a :attr:`hwsplit.run.grower.Grower.records` entry."""
    writer.add_scalar("stage/neurons_split", record.get("neurons_split", 0), step)
    for layer, width in record.get("widths", {}).items():
        writer.add_scalar(f"widths/{layer}", width, step)
    for layer, score in (scores or {}).items():
        values = score.eigenvalues.detach().double().cpu()
        if values.numel():
            writer.add_histogram(f"lambda/{layer}", values, step)


class RunBoard:
    """The event files of one run directory. ``log_dir`` None: a board that writes nothing.

    ``epochs_done``: epochs the directory's completed records already hold; the x axis goes on from
    there. The event file is opened at the first event, with that event's step as ``purge_step``:
    what an interrupted process wrote at that epoch or later is hidden, and a stage that resumes
    from its training state after epoch e (``partial-K.pt``) keeps the epochs before e.
    """

    def __init__(self, log_dir: str | Path | None, *, epochs_done: int = 0) -> None:
        self._writer: Any = None
        self._failed = log_dir is None
        self._epochs_done = epochs_done
        self.log_dir = None if log_dir is None else Path(log_dir)

    def _open(self, step: int) -> Any:
        """The writer, opened (purging the view from ``step`` on) at the first event; None when off."""
        if self._writer is None and not self._failed:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.log_dir), purge_step=step)
            except Exception as err:  # never fail a run for its event files
                self._fail(err)
        return self._writer

    def _fail(self, err: BaseException) -> None:
        log.warning("TensorBoard: cannot write event files in %s (%s: %s); the run goes on without them",
                    self.log_dir, type(err).__name__, err)
        writer, self._writer, self._failed = self._writer, None, True
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the warning is out
                pass

    def epoch(self, stats: Mapping[str, Any]) -> None:
        """One epoch's training stats (:func:`hwsplit.training.train.train_epoch`'s dict: epoch, loss, top1, lr)."""
        step = self._epochs_done + int(stats["epoch"]) + 1
        w = self._open(step)
        if w is None:
            return
        try:
            w.add_scalar("train/loss", stats["loss"], step)
            w.add_scalar("train/top1", stats["top1"], step)
            w.add_scalar("train/lr", stats["lr"], step)
            w.flush()  # on disk before a kill can come (a resumed stage keeps its earlier epochs)
        except Exception as err:
            self._fail(err)

    def stage(self, record: Mapping[str, Any], scores: Mapping[str, Any] | None = None) -> None:
        """A completed record (stage) at its last epoch; ``scores``: the splitting indices it grew on."""
        self._epochs_done += int(record.get("schedule", {}).get("epochs", 0))
        step = self._epochs_done
        w = self._open(step)
        if w is None:
            return
        try:
            w.add_scalar("stage/index", record["stage"], step)
            for split in ("test", "val"):
                for key in ("loss", "top1"):
                    if f"{split}_{key}" in record:
                        w.add_scalar(f"{split}/{key}", record[f"{split}_{key}"], step)
            cost = record.get("cost", {})
            if "value" in cost:
                w.add_scalar(f"stage/cost_{cost.get('unit') or 'value'}", cost["value"], step)
            w.add_scalar("stage/macs", record["macs"], step)
            w.add_scalar("stage/params", record["params"], step)
            measured = record.get("measured") or {}
            for key in ("latency_ms", "energy_mj"):
                value = measured.get(key)
                if isinstance(value, Mapping) and value.get("median") is not None:
                    w.add_scalar(f"stage/{key}", value["median"], step)
            write_step(w, record, scores, step)
            w.flush()
        except Exception as err:
            self._fail(err)

    def close(self) -> None:
        """Flush and close the event file; the board writes nothing more."""
        self._failed = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as err:
                self._fail(err)
            self._writer = None


def open_board(run: RunDir, config: Any, records: list[dict[str, Any]]) -> RunBoard:
    """The board of ``run`` (``run/tb``) continuing after ``records``; one that writes nothing when
    ``config.tensorboard`` is off or on ranks other than 0."""
    if not getattr(config, "tensorboard", True) or not is_main():
        return RunBoard(None)
    return RunBoard(run.tb, epochs_done=epochs_of(records))


@contextlib.contextmanager
def board_closed(board: RunBoard) -> Iterator[RunBoard]:
    """Close ``board`` (flush its events) when the block ends, however it ends."""
    try:
        yield board
    finally:
        board.close()


__all__ = ["RunBoard", "board_closed", "epochs_of", "open_board", "write_step"]
