"""Running a command on several processes: torchrun's environment, rank 0's jobs, one error for all ranks.

``torchrun --nproc-per-node N cli.py grow ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous in their environment. :func:`entry_point` turns any command into
one that runs on all of them: it initialises the process group from that environment (``gloo``
for CPU tensors, plus ``nccl`` for CUDA tensors when the machine has a GPU; one process per GPU,
``cuda:LOCAL_RANK``), and when any rank raises, every rank ends with the same one-line
:class:`RankFailed` (the first failure's message and exit status). :func:`on_main` runs a job on rank
0 only (writing the run directory, measuring the device) while the other ranks wait at a barrier,
so a measurement never overlaps training on the same device. See docs/design.md §5 and README
"Several processes".

A new command (as ``finetune`` did) gets all of this by decorating its library entry with
:func:`entry_point` (or by being called from a CLI command that is), writing its run directory
through :func:`on_main` or behind :func:`hwsplit.infra.distributed.is_main`, and training with
:func:`hwsplit.training.train.train` (which wraps the model in DDP itself).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from hwsplit.infra.distributed import barrier, broadcast_object, is_main, rank, world_size
from hwsplit.infra.errors import EXIT_FAILED, EXIT_USAGE, HwsplitError, RunFailed, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a collective may wait for a rank before the run fails (env HWSPLIT_DIST_TIMEOUT_S).
DEFAULT_TIMEOUT_S = 1800.0
_FAILURE_KEY = "hwsplit/failure"
_FAILURE_COUNT = "hwsplit/failures"


class RankFailed(RunFailed):
    """One rank of a multi-process run failed; every rank raises this with the first failure's message.

    ``exit_code`` is the failing rank's (2 for a bad setting, 1 for a failed run).
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Terminated(RuntimeError):
    """SIGTERM from the launcher (torchrun stops the other ranks when one exits with an error)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or similar) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env() -> bool:
    """Join the process group torchrun's environment describes; True if this call created it.

    Does nothing with one process or when a group exists already. Backends: ``gloo`` for CPU
    tensors (and every small reduction), ``nccl`` for CUDA tensors when CUDA is available; each
    rank's CUDA device is ``cuda:LOCAL_RANK``. Ranks other than 0 log warnings only.
    """
    if not launched() or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RankFailed(f"distributed: WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set "
                             "(start the command with torchrun)", EXIT_USAGE)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=float(os.environ.get("HWSPLIT_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    if rank() != 0:
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    log.info("process group: %d ranks (%s)", world_size(), torch.distributed.get_backend())
    return True


def shutdown() -> None:
    """Leave the process group (nothing without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone must not hide the real error
            torch.distributed.destroy_process_group()


def _exit_code(err: BaseException) -> int:
    code = getattr(err, "exit_code", None)  # hwsplit's errors, and the command line's usage errors
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)):
        return EXIT_USAGE
    return EXIT_FAILED


def _store() -> Any:
    """The rendezvous key-value store (torchrun's agent hosts it, so it outlives a dead rank), or None."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it, each rank reports its own error
        return None


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank is gone (killed, crashed, or stopped on its own error)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, (_Terminated, dist_error)) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("Connection closed", "Connection reset",
                                                                      "Broken pipe", "Timed out")))


def shared_failure(err: BaseException) -> RankFailed:
    """The one error every rank ends with: the first failure posted to the store, else this rank's.

    A rank that fails on its own error posts it; a rank whose collective broke because a peer is
    gone waits briefly for the peer's post and adopts it, so every rank prints the same line.
    """
    message, code = first_line(err), _exit_code(err)
    if _peer_lost(err):
        message = (f"another process of this {world_size()}-process run stopped without reporting why "
                   f"(killed, or out of memory?): {message}")
    mine = json.dumps({"rank": rank(), "message": message, "exit_code": code})
    store, payload = _store(), mine
    if store is not None:
        wait = datetime.timedelta(seconds=5)
        try:
            if _peer_lost(err):  # the peer that broke the collective may be posting its own error
                with contextlib.suppress(Exception):
                    store.wait([_FAILURE_KEY], wait)
            if not store.check([_FAILURE_KEY]) and store.add(_FAILURE_COUNT, 1) == 1:
                store.set(_FAILURE_KEY, mine)
            store.wait([_FAILURE_KEY], wait)
            payload = store.get(_FAILURE_KEY).decode()
        except Exception:  # noqa: BLE001 - the store is gone too: report this rank's own error
            payload = mine
    info = json.loads(payload)
    return RankFailed(f"{info['message']} (rank {info['rank']} of {world_size()})", int(info["exit_code"]))


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn the launcher's SIGTERM into an exception, so the rank reports the shared error and exits cleanly."""
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated("stopped by the launcher")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command: initialise the process group from torchrun's environment, run ``fn``, leave.

    With one process this only calls ``fn``. With several, an exception on any rank (other than
    ``KeyboardInterrupt``) ends every rank with the same :class:`RankFailed`; errors that are not
    hwsplit's own are logged with their traceback on the rank that raised them.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        created = init_from_env()
        if world_size() == 1:
            try:
                return fn(*args, **kwargs)
            finally:
                if created:
                    shutdown()
        try:
            with _sigterm_raises():
                return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except RankFailed:
            raise
        except Exception as err:
            if not isinstance(err, (HwsplitError, ValueError, OSError)) and not _peer_lost(err):
                log.exception("rank %d failed", rank())
            raise shared_failure(err) from err
        finally:
            if created:
                shutdown()

    return wrapper


def on_main(fn: Callable[..., T], *args: Any, share: bool = False, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on rank 0 while the other ranks wait at a barrier.

    Returns rank 0's result there, and ``None`` on the others unless ``share=True`` (then rank
    0's result, which must pickle). Used for every write of a run directory and for device
    measurements, which must not overlap training on the same device. If ``fn`` raises on rank 0,
    the others leave the barrier with :func:`shared_failure`'s error under :func:`entry_point`.
    """
    result = fn(*args, **kwargs) if is_main() else None
    barrier()
    return broadcast_object(result) if share else result


__all__ = ["RankFailed", "entry_point", "init_from_env", "launched", "on_main", "shared_failure", "shutdown"]
