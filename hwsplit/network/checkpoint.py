"""Stage checkpoints that load without pickle (written atomically by :mod:`hwsplit.infra.fsio`).

A checkpoint is ``{"format": "hwsplit.checkpoint/1", "stage": K, "architecture": {...},
"state_dict": {...}}`` saved with ``torch.save``; it is read back with
``torch.load(weights_only=True)``, so a crafted file cannot run code, and rebuilt into a plain
model by :func:`load_model`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsplit.infra.fsio import atomic_write
from hwsplit.network.models import architecture, model_from_architecture

FORMAT = "hwsplit.checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, *, stage: int, extra: dict[str, Any] | None = None) -> None:
    """Save ``model``'s architecture and weights (on the CPU) atomically."""
    payload = {
        "format": FORMAT,
        "stage": int(stage),
        "architecture": architecture(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    atomic_write(path, lambda f: _save(payload, f, Path(path)), binary=True)


#: Free bytes below which a failed torch.save is taken for a full disk.
_NEARLY_FULL = 1 << 20


def _save(payload: dict[str, Any], f: Any, path: Path) -> None:
    """``torch.save``; its ``RuntimeError`` on a full disk ("[enforce fail at inline_container.cc] ...
    unexpected pos") becomes the ``OSError`` (ENOSPC) any other writer gives."""
    try:
        torch.save(payload, f)
    except RuntimeError as err:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < _NEARLY_FULL:
            raise OSError(errno.ENOSPC, f"No space left on device ({free:,} bytes free)") from None
        raise OSError(errno.EIO, f"torch.save failed ({str(err).splitlines()[0] if str(err) else 'RuntimeError'})"
                      ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, read with ``weights_only=True``; ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        # torch's own message advises weights_only=False, which would run the file's code: never pass it on
        why = ("it holds Python objects beyond tensors and plain data, which hwsplit never unpickles"
               if "weights_only" in str(err) or "Unsupported global" in str(err) else err.__class__.__name__)
        raise ValueError(f"checkpoint: {path} is not a loadable hwsplit checkpoint ({why})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not an {FORMAT} file")
    return payload


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the plain model saved in a stage checkpoint (eval mode, on the CPU)."""
    payload = load_checkpoint(path)
    model = model_from_architecture(payload["architecture"], payload["state_dict"])
    return model.eval()
