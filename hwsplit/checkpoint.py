"""Durable files of a run: atomic writes and stage checkpoints that load without pickle.

A checkpoint is ``{"format": "hwsplit.checkpoint/1", "stage": K, "architecture": {...},
"state_dict": {...}}`` saved with ``torch.save``; it is read back with
``torch.load(weights_only=True)``, so a crafted file cannot run code, and rebuilt into a plain
model by :func:`load_model`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.models import architecture, model_from_architecture

FORMAT = "hwsplit.checkpoint/1"


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename over it.

    ``write(fileobj)`` produces the content. A crash, Ctrl-C or a failing write (disk full,
    permission) leaves the previous file intact and no partial file under ``path``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files: give the result the mode a plain open() would (or the old file's)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, model: nn.Module, *, stage: int, extra: dict[str, Any] | None = None) -> None:
    """Save ``model``'s architecture and weights (on the CPU) atomically."""
    payload = {
        "format": FORMAT,
        "stage": int(stage),
        "architecture": architecture(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    atomic_write(path, lambda f: torch.save(payload, f), binary=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, read with ``weights_only=True``; ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"checkpoint: {path} is not a loadable hwsplit checkpoint ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not an {FORMAT} file")
    return payload


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the plain model saved in a stage checkpoint (eval mode, on the CPU)."""
    payload = load_checkpoint(path)
    model = model_from_architecture(payload["architecture"], payload["state_dict"])
    return model.eval()
