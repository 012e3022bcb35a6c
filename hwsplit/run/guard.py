"""The failure and Ctrl-C bookkeeping every record loop shares, and the kill hooks of the crash tests.

:func:`guarded_records` turns a non-finite loss, a bad input image or a failed write into ``summary.md``'s
status and a :class:`~hwsplit.run.rundir.StageFailed`, and a Ctrl-C into an interrupted status (docs/design.md
§5); :func:`kill_point` SIGKILLs the process at a named point when ``HWSPLIT_KILL_AT`` names it (tests only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from hwsplit.infra.distributed import rank
from hwsplit.infra.errors import first_line
from hwsplit.run.rundir import RunDir, StageFailed, WriteFailed, write_summary
from hwsplit.training.bundle import BadImageError

log = logging.getLogger(__name__)


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


__all__ = ["KILL_AT_ENV", "KILL_RANK_ENV", "failure_kind", "guarded_records", "ignoring_interrupts", "kill_point"]
