"""The exceptions hwsplit raises on purpose, and the exit status each maps to (docs/design.md §1).

``cli.py`` maps by class, never by name: every :class:`HwsplitError` carries its ``exit_code``.
Each also derives from the built-in exception a Python caller would expect (``ValueError`` for a
bad argument, ``RuntimeError`` for a failed run), so library users can catch either.

    HwsplitError                      exit_code
    ├── ConfigError(ValueError)        2   a bad argument, file or field (the message names it)
    │   ├── RunLocked                  2   another process writes the run directory
    │   └── CostOutOfRange             2   a cost model prices a network <= 0 or not finite
    ├── DeviceUnavailableError         2   the hardware asked for is not on this machine
    └── RunFailed(RuntimeError)        1   a run stopped after keeping what it completed
        ├── StageFailed                    (hwsplit.run.rundir) a stage could not complete
        └── ExportMismatchError            (hwsplit.run.export) ONNX and PyTorch disagree
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty): what a
    one-line error shows."""
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


class HwsplitError(Exception):
    """Base class of hwsplit's deliberate errors; ``exit_code`` is the command line's exit status."""

    exit_code = EXIT_USAGE


class ConfigError(HwsplitError, ValueError):
    """A bad argument, input file or field; the message names it."""


class RunLocked(ConfigError):
    """Another live process holds the run directory's lock (one writer per run)."""


class CostOutOfRange(ConfigError):
    """A cost model priced a network at <= 0 or a non-finite cost: its profile does not fit that network."""


class DeviceUnavailableError(HwsplitError, RuntimeError):
    """The device or meter asked for (CUDA, NVML) is not available on this machine."""


class RunFailed(HwsplitError, RuntimeError):
    """A run stopped on a failure (non-finite loss, failed write, export mismatch); earlier work is intact."""

    exit_code = EXIT_FAILED


__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "ConfigError", "CostOutOfRange", "DeviceUnavailableError",
           "HwsplitError", "RunFailed", "RunLocked", "first_line"]
