"""Baselines recorded in the same run-directory format as growth, so reports compare them point for point.

(The ``--selection random`` baseline is a selection strategy: :func:`hwsplit.splitting.select.random_selection`.)

* :func:`width_baseline` — the family scaled uniformly by width multipliers, each network trained
  from scratch on one schedule, written as a run directory whose ``stages.jsonl`` has one record
  per multiplier (``"stage"`` = index, plus ``"width_mult"`` and ``"epochs"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hwsplit.infra.distributed import is_main, world_size
from hwsplit.infra.fsio import check_writable_name
from hwsplit.infra.parallel import on_main
from hwsplit.run.config import RUN_INFO_PREPROCESSING, RUN_INFO_WORLD_SIZE, GrowConfig, stage_epochs_in_all
from hwsplit.run.guard import guarded_records
from hwsplit.run.rundir import RunDir, continue_or_start, write_summary
from hwsplit.run.session import open_session, stage_seed
from hwsplit.run.stages import record_stage
from hwsplit.run.tblog import board_closed, open_board
from hwsplit.training.train import seed_everything

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Width-multiplier baseline
# --------------------------------------------------------------------------------------------

WIDTH_BASELINE = "width"


def parse_multipliers(text: str | Sequence[float]) -> list[float]:
    """``"0.25,0.5,1"`` (or a sequence) as positive floats; ``ValueError`` naming ``multipliers``."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"multipliers: cannot read {item!r} as a number (e.g. 0.25,0.5,1)") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"multipliers: expected positive numbers, got {item!r}")
        values.append(value)
    if not values:
        raise ValueError("multipliers: at least one is needed")
    if len(set(values)) != len(values):
        raise ValueError(f"multipliers: {text!r} lists a multiplier twice")
    return values


def width_baseline(config: GrowConfig, multipliers: Sequence[float], out: str | Path, *,
                   epochs: int | None = None, overwrite: bool = False, progress: Callable | None = None,
                   on_stage: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``config``'s seed family scaled by each multiplier from scratch; write a run directory.

    Multiplier ``m`` scales the widths of the seed ``grow`` would start from (its ``width_mult``
    times ``m``; for ``mlp`` the hidden widths), so ``1.0`` is the seed itself and, with
    ``--config standard``, the multipliers are the MobileNet paper's. Each network is trained for
    ``epochs`` (default :func:`~hwsplit.run.config.stage_epochs_in_all` of ``config.stages``: what a grow
    run of the same settings spends on its final network) in one schedule of ``config``'s kind (SGD, cosine
    by default), from the same initial seed (``config.seed * 1000``) and the same data order as grow's stage 0.

    ``out`` gets ``config.json`` (``config``'s fields plus ``"baseline": "width"``,
    ``"multipliers"``, ``"total_epochs"``), ``stages.jsonl`` (one record per multiplier, with the
    keys of a grow seed record plus ``"width_mult"`` and ``"epochs"``), ``stage-K.pt`` and
    ``summary.md``, all written atomically. An ``out`` holding this same baseline (same config.json) is
    continued after its completed networks (a network killed mid-training from its last epoch); another
    run in ``out`` is replaced only with ``overwrite=True`` (see :func:`hwsplit.run.rundir.start_fresh`).
    Returns the records.
    """
    multipliers = parse_multipliers(multipliers)
    total = stage_epochs_in_all(config, config.stages) if epochs is None else epochs
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    run = RunDir(out)
    check_writable_name(run.summary)
    session = open_session(config)  # data, family and cost model must load before anything is written
    for mult in multipliers:  # every network must have a cost the model can price (CostOutOfRange if not)
        session.cost_model.total(session.seed_network(width_mult=mult), session.input_shape)
    info = {**config.to_dict(), "baseline": WIDTH_BASELINE, "multipliers": multipliers, "total_epochs": total,
            RUN_INFO_WORLD_SIZE: world_size(), RUN_INFO_PREPROCESSING: session.preprocessing}
    with run.lock("write") if is_main() else contextlib.nullcontext():  # rank 0 alone writes the run
        kept = on_main(continue_or_start, run, info, overwrite=overwrite, share=True)
        return _train_all(run, config, session, multipliers, total, kept, progress=progress, on_stage=on_stage)


def _train_all(run: RunDir, config: GrowConfig, session: Any, multipliers: list[float], total: int,
               records: list[dict[str, Any]], *, progress: Callable | None,
               on_stage: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    title = f"width baseline: {config.model} on {config.dataset} × {', '.join(f'{m:g}' for m in multipliers)}"
    index = 0
    board = open_board(run, config, records)
    with board_closed(board), guarded_records(run, config, records,
                                              where=lambda: (index, f"width ×{multipliers[index]:g}"),
                                              noun="network", resume="run the same command again to continue",
                                              title=title):
        for index, mult in enumerate(multipliers):
            if index < len(records):
                continue
            seed_everything(stage_seed(config, 0))
            model = session.seed_network(width_mult=mult).to(session.device)

            def announce(record: dict[str, Any], mult: float = mult) -> None:
                log.info("width ×%g: test top-1 %.4f, %.4g MACs", mult, record["test_top1"], record["macs"])

            record_stage(run, session, model, index, records, config=config, epochs=total, loader_epoch=0,
                         extra={"width_mult": mult, "epochs": total, "epochs_in_all": total, "split": {},
                                "neurons_split": 0},
                         title=title, board=board, progress=progress, announce=announce, on_stage=on_stage)
    write_summary(run, config, records, status="done", title=title)
    return records


def is_baseline(config: Mapping[str, Any]) -> bool:
    return bool(config.get("baseline"))


__all__ = ["is_baseline", "parse_multipliers", "width_baseline"]
