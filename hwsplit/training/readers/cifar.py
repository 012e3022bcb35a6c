"""Reader of CIFAR-10 and CIFAR-100 in their pickled-batch form (torchvision may download them).

The pickles are read with an unpickler that builds only arrays, lists and dicts (never arbitrary objects).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hwsplit.training.bundle import (
    DataBundle,
    DataError,
    check_image_size,
    check_labels,
    in_memory_bundle,
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files: plain containers and numpy arrays only, never arbitrary code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    OSError,
)


def _read_pickle(path: Path, name: str, expected: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{name}: {path} is missing (expected {expected})") from None
    except _UNPICKLE_ERRORS as exc:  # any unpickling failure is a malformed file
        raise DataError(f"{name}: {path} is not readable as {expected} ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: {path} is not {expected} (got {type(obj).__name__})")
    return obj


def _get(entry: dict, key: str) -> Any:
    # Batches pickled by Python 2 have str keys; ones written from Python 3 often have bytes keys.
    if key in entry:
        return entry[key]
    return entry.get(key.encode())


@dataclass(frozen=True)
class _CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    meta_key: str
    label_key: str
    num_classes: int
    tv_class: str


CIFAR10 = _CifarFormat(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "label_names",
    "labels",
    10,
    "CIFAR10",
)

CIFAR100 = _CifarFormat(
    "cifar100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_label_names",
    "fine_labels",
    100,
    "CIFAR100",
)


def _read_cifar_split(fmt: _CifarFormat, root: Path, files: tuple[str, ...], limit: int | None):
    expected = f"a pickled dict with 'data' (N, 3072) uint8 and '{fmt.label_key}'"
    xs, ys, have = [], [], 0
    for fname in files:
        if limit is not None and have >= limit:
            break  # enough samples: skip reading the remaining batch files
        path = root / fname
        entry = _read_pickle(path, fmt.name, expected)
        data, labels = _get(entry, "data"), _get(entry, fmt.label_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{fmt.name}: {path} is not {expected} (data is {got})")
        if labels is None:
            raise DataError(f"{fmt.name}: {path} is not {expected} (no '{fmt.label_key}')")
        labels = np.asarray(labels)
        if (
            labels.ndim != 1
            or labels.shape[0] != data.shape[0]
            or not np.issubdtype(labels.dtype, np.integer)
        ):
            raise DataError(
                f"{fmt.name}: {path} has {labels.shape} {labels.dtype} labels for "
                f"{data.shape[0]} images (expected one integer label per image)"
            )
        xs.append(data.reshape(-1, 3, 32, 32))  # stored channel-major: already CHW
        ys.append(labels.astype(np.int64))
        have += data.shape[0]
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return x, y


def load_cifar(
    fmt: _CifarFormat,
    *,
    data_dir: Path | None,
    download: bool,
    seed: int,
    augment: bool,
    limit: int | None,
    test_limit: int | None,
    image_size: int | None,
) -> DataBundle:
    """CIFAR-10/100 in the python-pickled batch format torchvision uses (no md5 check: user copies)."""
    check_image_size(fmt.name, image_size, 32)
    if data_dir is None:
        raise DataError(f"{fmt.name}: no data directory given (expected one holding {fmt.folder}/)")
    root = data_dir / fmt.folder
    if download:
        import torchvision

        try:
            # torchvision fetches, checks md5 and extracts; we then read the files ourselves.
            getattr(torchvision.datasets, fmt.tv_class)(str(data_dir), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as exc:  # network, md5 or archive errors
            raise DataError(f"{fmt.name}: download into {data_dir} failed ({exc})") from None
    if not root.is_dir():
        raise DataError(
            f"{fmt.name}: {data_dir} has no {fmt.folder}/ "
            "(pass --download to fetch it, or --dataset npz for an npz directory)"
        )
    tr_x, tr_y = _read_cifar_split(fmt, root, fmt.train_files, limit)
    te_x, te_y = _read_cifar_split(fmt, root, fmt.test_files, test_limit)
    class_names = None
    meta_path = root / fmt.meta_file
    if meta_path.exists():
        names = _get(_read_pickle(meta_path, fmt.name, f"a pickled dict with '{fmt.meta_key}'"), fmt.meta_key)
        if names is not None:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    num_classes = len(class_names) if class_names else fmt.num_classes
    check_labels(fmt.name, root, tr_y, te_y, num_classes)
    return in_memory_bundle(
        fmt.name,
        tr_x,
        tr_y,
        te_x,
        te_y,
        num_classes=num_classes,
        augment=augment,
        limit=limit,
        test_limit=test_limit,
        class_names=class_names,
    )


__all__ = ["CIFAR10", "CIFAR100", "load_cifar"]
