"""Data sets by name: the registry of readers and :func:`load_dataset`.

``digits`` (embedded), ``cifar10``/``cifar100``, ``npz`` and ``imagefolder``, one reader each
(:mod:`hwsplit.training.readers`), each returning a :class:`~hwsplit.training.bundle.DataBundle`; batches
come from :mod:`hwsplit.training.loaders`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hwsplit.training.bundle import DataBundle
from hwsplit.training.readers.cifar import CIFAR10, CIFAR100, load_cifar
from hwsplit.training.readers.digits import load_digits
from hwsplit.training.readers.imagefolder import load_imagefolder
from hwsplit.training.readers.npz import load_npz


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit: must be >= 1 training samples, got {limit}")


def _test_limit(limit: int | None) -> int | None:
    return None if limit is None else max(1, limit // 5)


_Loader = Callable[..., DataBundle]


def _registry() -> dict[str, _Loader]:
    return {
        "digits": load_digits,
        "cifar10": lambda **kw: load_cifar(CIFAR10, **kw),
        "cifar100": lambda **kw: load_cifar(CIFAR100, **kw),
        "npz": load_npz,
        "imagefolder": load_imagefolder,
    }


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_registry())


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    augment: bool = True,
    limit: int | None = None,
    image_size: int | None = None,
    test_limit: int | str | None = "auto",
) -> DataBundle:
    """Load data set ``name`` (see :func:`available_datasets`).

    Args:
        name: ``digits`` (scikit-learn, embedded), ``cifar10``/``cifar100`` (pickled batches under
            ``data_dir``), ``npz`` (``data_dir/train.npz``, ``data_dir/test.npz``) or ``imagefolder``
            (``data_dir/train/<class>/``, ``data_dir/val/<class>/``).
        data_dir: directory holding the data (not used by ``digits``).
        download: let torchvision fetch CIFAR into ``data_dir`` (other sets ignore it).
        seed: seed of the ``digits`` train/test split (the others have fixed splits).
        augment: random crop + horizontal flip of training batches (cifar, npz, imagefolder; never digits).
        limit: keep the first ``limit`` training samples.
        test_limit: keep the first ``test_limit`` test samples; ``"auto"`` (default): ``max(1, limit // 5)``
            when ``limit`` is given, else all; ``None``: all of them.
        image_size: crop size in pixels for ``imagefolder`` (default 224); other sets are not resized
            and only accept their native size.

    Raises:
        DataError: the directory is missing or malformed.
        ValueError: an argument is out of range (the message names it).
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"name: unknown dataset {name!r} (available: {', '.join(sorted(registry))})")
    _check_limit(limit)
    if test_limit == "auto":
        test_limit = _test_limit(limit)
    elif test_limit is not None and (isinstance(test_limit, bool) or not isinstance(test_limit, int) or test_limit < 1):
        raise ValueError(f"test_limit: expected 'auto', None or an integer >= 1, got {test_limit!r}")
    path = None if data_dir is None else Path(data_dir).expanduser()
    return registry[name](
        data_dir=path, download=download, seed=seed, augment=augment, limit=limit, test_limit=test_limit,
        image_size=image_size,
    )


__all__ = ["available_datasets", "load_dataset"]
