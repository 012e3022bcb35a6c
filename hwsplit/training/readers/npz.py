"""Reader of ``train.npz``/``test.npz`` data sets: ``x`` uint8 N×H×W×C and ``y`` integer labels."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from hwsplit.training.bundle import (
    DataBundle,
    DataError,
    check_image_size,
    check_labels,
    in_memory_bundle,
    label_space,
)


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    expected = "'x' uint8 (N, H, W, C) and 'y' integer labels (N,)"
    if not path.is_file():
        raise DataError(f"npz: {path} is missing (expected {split}.npz with {expected})")
    try:
        with np.load(path, allow_pickle=False) as f:  # data, never code
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"npz: {path} has no {' or '.join(repr(k) for k in missing)} (expected {expected})"
                )
            x, y = f["x"], f["y"]
            names = None
            if "label_names" in f.files:
                try:
                    names = [str(n) for n in f["label_names"].tolist()]
                except ValueError:  # an object array would need pickle: ignore the names
                    names = None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(f"npz: {path} holds object arrays (pickled Python objects); hwsplit reads only "
                            f"numeric arrays (expected {expected})") from None
        raise DataError(f"npz: {path} is not a readable npz archive ({type(exc).__name__})") from None
    if x.dtype != np.uint8:
        raise DataError(f"npz: {path} has 'x' of dtype {x.dtype} (expected uint8 0..255)")
    if x.ndim == 3:  # grayscale (N, H, W)
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"npz: {path} has 'x' of shape {x.shape} (expected (N, H, W, C) or (N, H, W))")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"npz: {path} has 'y' of shape {y.shape} dtype {y.dtype} (expected integer (N,))")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"npz: {path} has {x.shape[0]} images but {y.shape[0]} labels (expected equal)")
    return x, y, names


def load_npz(
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """A directory with train.npz and test.npz: 'x' uint8 (N, H, W, C), 'y' integer labels (N,)."""
    if data_dir is None:
        raise DataError("npz: no data directory given (expected one holding train.npz and test.npz)")
    if not data_dir.is_dir():
        raise DataError(f"npz: {data_dir} is not a directory (expected one holding train.npz and test.npz)")
    tr_x, tr_y, names = _read_npz(data_dir / "train.npz", "train")
    te_x, te_y, _ = _read_npz(data_dir / "test.npz", "test")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise DataError(
            f"npz: {data_dir} has train images {tr_x.shape[1:]} but test images "
            f"{te_x.shape[1:]} (expected the same (H, W, C))"
        )
    if tr_x.shape[0] == 0 or te_x.shape[0] == 0:
        raise DataError(f"npz: {data_dir} has an empty train or test split (expected samples in both)")
    check_image_size("npz", image_size, int(tr_x.shape[1]))
    num_classes = len(names) if names else label_space(data_dir, tr_y, te_y)
    if limit is not None:  # slice before the NHWC -> NCHW copy
        tr_x, tr_y = tr_x[:limit], tr_y[:limit]
    if test_limit is not None:
        te_x, te_y = te_x[:test_limit], te_y[:test_limit]
    tr = torch.from_numpy(np.ascontiguousarray(tr_x.transpose(0, 3, 1, 2)))
    te = torch.from_numpy(np.ascontiguousarray(te_x.transpose(0, 3, 1, 2)))
    tr_yt = torch.from_numpy(tr_y.astype(np.int64))
    te_yt = torch.from_numpy(te_y.astype(np.int64))
    check_labels("npz", data_dir, tr_yt, te_yt, num_classes)
    return in_memory_bundle(
        "npz", tr, tr_yt, te, te_yt, num_classes=num_classes, augment=augment, limit=None, test_limit=None,
        class_names=names
    )


__all__ = ["load_npz"]
