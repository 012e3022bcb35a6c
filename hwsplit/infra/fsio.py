"""Durable file writes: the one atomic writer every layer uses (run directories, checkpoints, profiles).

A file is written through a temporary file in the same directory (``.NAME.XXXX.tmp``), flushed,
fsynced and renamed over the target, so a crash, Ctrl-C or a failing write (disk full,
permission) leaves the previous file intact and no partial file under the target's name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Longest file name most file systems accept (ext4, xfs, btrfs, tmpfs), in bytes.
NAME_MAX = 255
#: What :func:`atomic_write` adds to a file name for its temporary file: ".", ".XXXXXXXX.tmp".
_TMP_EXTRA = 1 + 1 + 8 + 4


def check_writable_name(path: str | Path) -> None:
    """``ValueError`` naming ``path`` when it (or its atomic-write temporary) would exceed NAME_MAX bytes."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ValueError(f"path: a component of {path} is longer than {NAME_MAX} bytes")
    if len(os.fsencode(path.name)) + _TMP_EXTRA > NAME_MAX:
        raise ValueError(f"path: the file name {path.name[:40]}... is too long to be written safely "
                         f"(at most {NAME_MAX - _TMP_EXTRA} bytes)")


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename over it.

    ``write(fileobj)`` produces the content. The result gets the mode a plain ``open()`` would
    give it (or the previous file's). Any exception leaves the previous file intact.
    """
    path = Path(path)
    check_writable_name(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # name the file the user asked for, not the temporary one
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
    try:
        # mkstemp creates 0600 files: give the result the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno is not None and str(path) not in str(err):
            raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, data: Any, *, indent: int = 2) -> None:
    """JSON with sorted keys; ``allow_nan=False`` so that no non-standard ``Infinity``/``NaN`` is written."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, allow_nan=False) + "\n")


__all__ = ["NAME_MAX", "atomic_write", "atomic_write_json", "atomic_write_text", "check_writable_name"]
